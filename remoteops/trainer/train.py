"""The built-in trainer: transformers.Trainer + peft LoRA/QLoRA with health watch.

``prepare`` reads and tokenizes the data, ``dry_run`` validates everything
without training, ``run_train`` trains one stage into a run directory and
returns its summary entry (``status`` is ``done`` or ``failed``).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from remoteops.common.clock import now_iso_precise
from remoteops.common.errors import ConfigError
from remoteops.trainer.checkpoints import list_checkpoints
from remoteops.trainer.distributed import (barrier, describe as describe_ranks, is_main,
                                           leads_node, local_rank, rank, spans_nodes,
                                           undo_eval_preparation, world_size)
from remoteops.trainer.trainer_class import trainer_class

_trainer_class = trainer_class  # the name the benches use
from remoteops.trainer.data import Collator, DataError, encode, encode_records, read_jsonl
from remoteops.common.rundir import RunDir
from remoteops.trainer.stageconf import StageConfig


def say(msg: str) -> None:
    print(f"[remoteops] {msg}", flush=True)


@dataclass
class Prepared:
    tokenizer: Any
    train: list[dict]
    eval: list[dict]
    bad: list[str] = field(default_factory=list)
    eval_source: str = ""

    @property
    def tokens(self) -> int:
        return sum(len(x["input_ids"]) for x in self.train)

    @property
    def target_tokens(self) -> int:
        return sum(sum(1 for t in x["labels"] if t != -100) for x in self.train)


def quiet_transformers() -> None:
    import warnings

    import transformers
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"base model {path} not found; set train.base_model, or build the demo "
                          "model with 'remoteops-agent make-demo-model'.")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def prepare(cfg: StageConfig, tokenizer=None) -> Prepared:
    """Read, validate and tokenize the stage's training and eval data."""
    t = cfg.train
    if cfg.live:  # its records are read as they arrive (trainer/live_data)
        report, bad, train = None, [], []
    else:
        report = read_jsonl(cfg.dataset, t["max_bad_lines"], base=cfg.project_dir)
        bad = list(report.bad)
    tokenizer = tokenizer or load_tokenizer(cfg.base_model)
    if report is not None:
        train = encode_records(tokenizer, report.records, t["max_seq_len"], t["max_bad_lines"],
                               bad)
    evals: list[dict] = []
    source = ""
    if cfg.eval_set:
        ev = read_jsonl(cfg.eval_set, t["max_bad_lines"], kind="eval", base=cfg.project_dir)
        for rec in ev.records:
            if rec.extra.get("reference"):
                msgs = rec.messages + [{"role": "assistant", "content": rec.extra["reference"]}]
                try:
                    evals.append(encode(tokenizer, msgs, t["max_seq_len"]))
                except ValueError:
                    continue
        source = ev.path
    elif t["eval_holdout"] > 0 and len(train) >= 5 and report is not None:
        order = list(range(len(train)))
        random.Random(t["seed"]).shuffle(order)
        n = max(1, int(round(len(train) * t["eval_holdout"])))
        held = set(order[:n])
        evals = [x for i, x in enumerate(train) if i in held]
        train = [x for i, x in enumerate(train) if i not in held]
        source = f"{n} lines held out of {report.path}"
    if not train and report is not None:
        raise DataError(f"{report.path}: nothing left to train on; add data lines.")
    return Prepared(tokenizer, train, evals, bad, source)


def plan_steps(cfg: StageConfig, n: int) -> tuple[int, int]:
    t = cfg.train  # under torchrun each optimizer step takes a batch from every rank
    per_epoch = math.ceil(math.ceil(n / (t["batch_size"] * world_size())) / t["grad_accum"])
    return per_epoch, max(1, math.ceil(per_epoch * t["epochs"]))


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _use_qlora(cfg: StageConfig, log: Callable[[str], None]) -> bool:
    if cfg.train["quantization"] != "qlora":
        return False
    if _cuda():
        return True
    if cfg.train["qlora_fallback"]:
        log("QLoRA asked for (train.quantization = \"qlora\") but no CUDA GPU is visible: "
            "falling back to plain LoRA in full precision (train.qlora_fallback = true).")
        return False
    raise ConfigError("train.quantization = \"qlora\" needs a CUDA GPU and none is visible; run "
                      "on a GPU server, set quantization = \"none\", or allow the LoRA fallback "
                      "with train.qlora_fallback = true.")


def dry_run(cfg: StageConfig, log: Callable[[str], None] = say) -> dict[str, Any]:
    """Validate config, data and model loading; report sizes and a memory estimate."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    prep = prepare(cfg)
    if cfg.live:  # what the live set holds now
        from remoteops.trainer.live_data import records_now
        prep.train, prep.bad, note = records_now(cfg, prep.tokenizer)
        log(note)
    qlora = _use_qlora(cfg, log)
    mconf = AutoConfig.from_pretrained(str(cfg.base_model))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mconf)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [x for x in cfg.train["lora_targets"] if x not in names]
    if missing:
        raise ConfigError(f"train.lora_targets {missing} match no module of {cfg.base_model}; "
                          f"choose from e.g. {sorted(n for n in names if n.endswith('proj'))}.")
    n_params = sum(p.numel() for p in model.parameters())
    hidden = getattr(mconf, "hidden_size", 0)
    layers = getattr(mconf, "num_hidden_layers", 0)
    lora_params = 0
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in cfg.train["lora_targets"] and hasattr(mod, "in_features"):
            lora_params += cfg.train["lora_r"] * (mod.in_features + mod.out_features)
    per_epoch, total = plan_steps(cfg, len(prep.train))
    gpu = _cuda()
    weight_bytes = 0.55 if qlora else (2 if gpu else 4)
    longest = max(len(x["input_ids"]) for x in prep.train)
    act = cfg.train["batch_size"] * longest * hidden * layers * 34 * (2 if gpu else 4)
    logits = cfg.train["batch_size"] * longest * getattr(mconf, "vocab_size", 0) * 8
    mem = n_params * weight_bytes + lora_params * 16 + act + logits
    info = {"stage": cfg.name, "preset": cfg.preset, "samples": len(prep.train),
            "eval_samples": len(prep.eval), "skipped_lines": len(prep.bad),
            "tokens": prep.tokens, "target_tokens": prep.target_tokens,
            "longest": longest, "steps_per_epoch": per_epoch, "total_steps": total,
            "epochs": cfg.train["epochs"], "params": n_params, "lora_params": lora_params,
            "qlora": qlora, "device": "cuda" if gpu else "cpu",
            "memory_estimate_gb": round(mem / 2**30, 3)}
    for line in prep.bad:
        log(f"skipped {line}")
    log(f"dry run of stage '{cfg.name}' (preset {cfg.preset}): {len(prep.train)} samples, "
        f"{prep.tokens} tokens ({prep.target_tokens} trained), longest {longest}; "
        f"{len(prep.eval)} eval samples; {len(prep.bad)} bad lines skipped")
    log(f"plan: {cfg.train['epochs']:g} epochs x {per_epoch} steps = {total} optimizer steps "
        f"(batch {cfg.train['batch_size']}, grad accum {cfg.train['grad_accum']}, "
        f"lr {cfg.train['lr']:g}); model {n_params / 1e6:.2f}M params, LoRA "
        f"{lora_params / 1e6:.3f}M; {'QLoRA' if qlora else 'LoRA'} on {info['device']}; "
        f"memory ~{info['memory_estimate_gb']:.2f} GiB (rough estimate)")
    log("dry run OK: nothing was trained")
    return info


def build_model(cfg: StageConfig, log: Callable[[str], None] = say):
    """The base model with a fresh LoRA adapter (QLoRA base when configured and possible)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    qlora = _use_qlora(cfg, log)
    kwargs: dict[str, Any] = {}
    if _cuda():
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        kwargs["dtype"] = torch.float32
    if qlora:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": local_rank()}  # under torchrun: this rank's GPU
    model = AutoModelForCausalLM.from_pretrained(str(cfg.base_model), **kwargs)
    if qlora:
        model = prepare_for_kbit(model)
    set_seed(cfg.train["seed"])
    lora = LoraConfig(r=cfg.train["lora_r"], lora_alpha=cfg.train["lora_alpha"],
                      lora_dropout=cfg.train["lora_dropout"],
                      target_modules=list(cfg.train["lora_targets"]), task_type="CAUSAL_LM")
    return get_peft_model(model, lora), qlora


def prepare_for_kbit(model):
    """peft's preparation of a 4-bit base (gradient checkpointing on), with the checkpoint
    mode torch has always defaulted to, given explicitly: peft passes none, and torch then
    warns on the user's log that it must be given and will become an error. Reentrant, as
    before: on an H100 (bench-qlora, 2026-11-27) a step took 0.96x plain HF's in this mode
    and 1.28x in the non-reentrant one (another run of the same bench)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, gradient_checkpointing_kwargs={"use_reentrant": True})


def training_args(cfg: StageConfig, output_dir: Path, has_eval: bool, **extra):
    import torch
    from transformers import TrainingArguments

    t = cfg.train
    gpu = torch.cuda.is_available()
    bf16 = gpu and torch.cuda.is_bf16_supported()
    strategy = "epoch" if has_eval else "no"
    kw = dict(
        output_dir=str(output_dir), num_train_epochs=t["epochs"],
        per_device_train_batch_size=t["batch_size"], per_device_eval_batch_size=t["batch_size"],
        gradient_accumulation_steps=t["grad_accum"], learning_rate=t["lr"],
        lr_scheduler_type=t["lr_scheduler"], warmup_steps=t["warmup_steps"],
        weight_decay=t["weight_decay"], max_grad_norm=t["max_grad_norm"],
        logging_steps=t["logging_steps"], logging_nan_inf_filter=False,
        eval_strategy=strategy, save_strategy="epoch", save_total_limit=t["save_total_limit"],
        load_best_model_at_end=has_eval, metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False, seed=t["seed"], data_seed=t["seed"], use_cpu=not gpu,
        bf16=bf16, fp16=gpu and not bf16, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, optim="adamw_torch",
        ddp_find_unused_parameters=False,  # under torchrun: every LoRA weight is used
        save_on_each_node=spans_nodes(),  # no shared filesystem: each machine can resume
    )
    kw.update(extra)
    return TrainingArguments(**kw)


def run_train(cfg: StageConfig, run_path: Path, resume: Path | None = None,
              log: Callable[[str], None] = say, rules: list | None = None) -> dict[str, Any]:
    """Train one stage into ``run_path``; returns the stage's summary entry.

    ``rules`` are the ``health_rules`` plugins' rules, checked before each optimizer step.
    """
    from remoteops.trainer.callbacks import CheckpointReporter, MetricsCallback
    from remoteops.trainer.health import HealthCallback, classify_exception

    quiet_transformers()
    main = is_main()  # under torchrun rank 0 speaks and writes for the stage
    if not main:
        log = lambda message: None  # noqa: E731
    run = RunDir(run_path, cfg.name)
    old = json.loads((run.path / "summary.json").read_text(encoding="utf-8")).get(
        "stages", {}).get(cfg.name, {}) if (resume and (run.path / "summary.json").exists()) else {}
    started = time.time()
    entry: dict[str, Any] = {"status": "running", "reason": "", "started": now_iso_precise(),
                             "pid": os.getpid(), "config": cfg.as_dict(), "run_dir": str(run.path),
                             "resumed_from": str(resume) if resume else None,
                             "base_eval_loss": old.get("base_eval_loss"),
                             "world_size": world_size()}
    if main:
        run.clear_signals()
        run.update_summary(entry)
        run.start_heartbeat(cfg.health["heartbeat_seconds"])
    elif leads_node():
        run.clear_signals()
    saved: list[dict] = []
    crashed = False

    def failed(reason: str, message: str, step: int | None, own: bool = False) -> None:
        """``own``: this rank's crash (torchrun ends the others): it writes, whichever rank."""
        entry.update(status="failed", reason=reason, message=message, failed_step=step)
        if main or own or leads_node():  # another machine's runner reads its own run dir
            run.signal("failed", reason, message=message, step=step, rank=rank())
            say(f"stage '{cfg.name}' FAILED ({reason}) at step {step}"
                f"{'' if main else f' on rank {rank()}'}: {message}")

    try:
        live = None
        if cfg.live:  # wait (visibly) for min_samples before loading anything big
            from remoteops.trainer.live_data import LiveRun
            if world_size() > 1:
                raise ConfigError(f"stage '{cfg.name}' trains on live data, which runs in one "
                                  "process; set executor = \"process\" for it.")
            live = LiveRun(cfg, run, log)
            live.wait_ready()
        prep = prepare(cfg)
        for line in prep.bad:
            log(f"skipped {line}")
        entry.update(samples=len(prep.train), eval_samples=len(prep.eval),
                     skipped_lines=len(prep.bad), tokens=prep.tokens)
        model, qlora = build_model(cfg, log)
        entry["qlora"] = qlora
        collator = Collator(prep.tokenizer.pad_token_id)
        health = HealthCallback(
            loss_max=cfg.health["loss_max"], explode_ratio=cfg.health["explode_ratio"],
            warmup_check_steps=cfg.health["warmup_check_steps"],
            stagnation_steps=int(cfg.health["stagnation_steps"]),
            stagnation_min_delta=float(cfg.health["stagnation_min_delta"]),
            on_healthy=lambda step: main and (
                run.signal("healthy", "warmup check passed", step=step),
                log(f"stage '{cfg.name}' healthy after {step} steps")),
            on_failure=lambda reason, msg, step: None, rules=rules)
        metrics = MetricsCallback(run, collator, live.metrics_extra if live else None)
        args = training_args(cfg, run.checkpoints, bool(prep.eval),
                             **(live.training_overrides() if live else {}))
        if live:
            live.start(prep.tokenizer, resume)
        trainer = (live.trainer_class(trainer_class()) if live else trainer_class())(
            model=model, args=args, train_dataset=live.dataset() if live else prep.train,
            eval_dataset=prep.eval or None, data_collator=collator,
            processing_class=prep.tokenizer, health=health, fault=cfg.train["inject_fault"],
            callbacks=[health, *([metrics] if main else []),
                       CheckpointReporter(log, saved.append), *([live.callback()] if live else [])])
        per_epoch, total = plan_steps(cfg, max(1, len(prep.train)))
        if resume:
            state = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8"))
            if main:
                run.truncate_metrics_after(int(state.get("global_step", 0)))
            log(f"resuming stage '{cfg.name}' from {resume} (step {state.get('global_step')})")
        elif prep.eval:
            entry["base_eval_loss"] = trainer.evaluate()["eval_loss"]
            undo_eval_preparation(trainer)  # else train() would not wrap the model in DDP
            log(f"base model eval_loss {entry['base_eval_loss']:.4f}")
        if live:
            entry["samples"] = len(live.set.entries())
            log(f"training stage '{cfg.name}' on live data {live.set.dest} (preset {cfg.preset}"
                f", batch {cfg.train['batch_size']}, grad accum {cfg.train['grad_accum']}): "
                f"{entry['samples']} samples so far, each trained {live.schedule.visits} "
                f"time(s), {'until max_steps ' + str(live.max_steps) if live.max_steps else 'until sync-data --done'}"
                f"; run dir {run.path}")
        else:
            log(f"training stage '{cfg.name}' (preset {cfg.preset}, batch "
                f"{cfg.train['batch_size']}{f' x {world_size()} ranks' if world_size() > 1 else ''}"
                f", grad accum {cfg.train['grad_accum']}): "
                f"{len(prep.train)} samples, {total} steps, run dir {run.path}")
            if describe_ranks():  # which backend the ranks agree over (nccl, gloo)
                log(f"distributed: {describe_ranks()}")
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if live:
            live.finish()
            entry["live"] = live.summary()
            entry["samples"] = entry["live"]["samples"]
        entry["train_loss"] = result.training_loss
        entry["final"] = dict(metrics.last)
        if health.failure:
            failed(health.failure["reason"], health.failure["message"], health.failure["step"])
        else:
            best = trainer.state.best_model_checkpoint
            entry["best"] = {"checkpoint": best, "eval_loss": trainer.state.best_metric}
            if prep.eval:  # the model now holds the best checkpoint's weights
                entry["adapter_eval_loss"] = trainer.evaluate()["eval_loss"]
            entry.update(status="done", adapter=str(cfg.adapter_dir))
            if main:
                cfg.adapter_dir.parent.mkdir(parents=True, exist_ok=True)
                trainer.model.save_pretrained(str(cfg.adapter_dir))
                prep.tokenizer.save_pretrained(str(cfg.adapter_dir))
                run.signal("done", "training finished", adapter=str(cfg.adapter_dir),
                           final=entry["final"], best=entry["best"])
            log(f"stage '{cfg.name}' done: adapter saved to {cfg.adapter_dir}")
    except ConfigError as exc:
        failed(classify_exception(exc), str(exc), None)
        raise
    except BaseException as exc:  # noqa: BLE001 - classify, record, then report
        crashed = True  # the other ranks may wait in a collective: torchrun ends them
        reason = classify_exception(exc)
        failed(reason, f"{type(exc).__name__}: {exc}", run.step + 1, own=True)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
    finally:
        entry["duration_s"] = round(time.time() - started, 2)
        entry["finished"] = now_iso_precise()
        entry["checkpoints"] = [{k: c[k] for k in ("path", "step", "epoch", "size", "eval_loss",
                                                   "best", "latest")}
                                for c in list_checkpoints(run.checkpoints)]
        if main:
            run.update_summary(entry)
            run.stop_heartbeat()
    if not crashed:
        barrier()  # no rank exits (and has torchrun stop the rest) before rank 0 has written
    return entry
