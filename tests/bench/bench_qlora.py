"""QLoRA on a CUDA GPU: our trainer against a plain Hugging Face 4-bit run (``invoke bench-qlora``).

Needs a CUDA GPU and bitsandbytes; prints one line and exits 2 without them.

Both sides train the same random-weight model (Qwen3 architecture, built from a
config here, nothing downloaded) on the same fixed-length batches with LoRA on a
4-bit nf4 base (double quant, bf16 compute):

- *plain*: what a user writes by hand: ``BitsAndBytesConfig`` +
  ``prepare_model_for_kbit_training`` + ``get_peft_model`` + ``transformers.Trainer``;
- *ours*: the built-in trainer's own pieces: ``build_model`` and ``training_args``
  from the stage's config, our Trainer subclass with the health watch (its pre-step
  loss and gradient checks), metrics.csv and checkpoint reporting.

Runs alternate (plain, ours, ours, plain, ...) so noise hits both alike. The result
is tokens per second from the median optimizer-step time and their ratio
(ours / plain; 1.0 means no overhead). ``--end-to-end`` also runs the real
``remoteops-agent train`` command with ``quantization = "qlora"`` on the same model
and checks that it exits 0 and writes the adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    return StepTimer()


def _project(tmp: Path, model_dir: Path, batch: int, accum: int, seq: int) -> Path:
    """A project whose one stage trains with QLoRA on ``model_dir``."""
    from remoteops.trainer.demo_model import copy_demo_project

    project = tmp / "project"
    copy_demo_project(project)
    toml = (f'[train]\nbase_model = "{model_dir}"\nquantization = "qlora"\n'
            f"batch_size = {batch}\ngrad_accum = {accum}\nmax_seq_len = {seq}\nepochs = 1\n"
            "eval_holdout = 0.0\n"
            'lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", '
            '"up_proj", "down_proj"]\n\n[stages.all]\ndataset = "data/all.jsonl"\n')
    (project / "remoteops.toml").write_text(toml, encoding="utf-8")
    return project


def _batches(tokenizer, n: int, seq: int) -> list[dict]:
    """``n`` examples of exactly ``seq`` tokens (fixed length: tokens per step are known)."""
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    out = []
    for _ in range(n):
        ids = torch.randint(10, vocab, (seq,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids), "attention_mask": [1] * seq})
    return out


def run_bench(steps: int = 30, repeats: int = 2, warmup: int = 5, hidden: int = 2048,
              layers: int = 16, batch: int = 4, accum: int = 2, seq: int = 512,
              end_to_end: bool = False, log=print) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench-qlora needs a CUDA GPU; none is visible here.")
    try:
        import bitsandbytes
    except ImportError:
        raise SystemExit("bench-qlora needs bitsandbytes: pip install -c constraints.txt "
                         "bitsandbytes") from None
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, PrinterCallback, Trainer,
                              TrainingArguments)

    from remoteops.common.config import load_settings
    from remoteops.trainer.data import Collator
    from remoteops.trainer.demo_model import build_demo_model
    from remoteops.trainer.stageconf import resolve_stage
    from remoteops.trainer.train import (build_model, load_tokenizer, quiet_transformers,
                                         training_args)
    from tests.bench.bench_trainer import train_ours

    quiet_transformers()
    tmp = Path(tempfile.mkdtemp(prefix="remoteops-bench-qlora-"))
    t0 = time.time()
    model_dir = build_demo_model(tmp / "model", seed=0, hidden_size=hidden, layers=layers)
    log(f"model: hidden {hidden}, {layers} layers, built in {time.time() - t0:.1f}s")
    project = _project(tmp, model_dir, batch, accum, seq)
    cfg = resolve_stage(load_settings(project), "all")
    tok = load_tokenizer(model_dir)
    data = _batches(tok, steps * batch * accum, seq)
    collator = Collator(tok.pad_token_id)
    targets = list(cfg.train["lora_targets"])
    tokens_per_step = batch * accum * seq

    def plain(out: Path, timer) -> None:
        qconf = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=qconf,
                                                    dtype=torch.bfloat16, device_map={"": 0})
        base = prepare_model_for_kbit_training(base)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                target_modules=targets, task_type="CAUSAL_LM"))
        args = TrainingArguments(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum, learning_rate=1e-4, logging_steps=1,
            save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            bf16=True, remove_unused_columns=False, seed=0, optim="adamw_torch")
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                          callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        trainer.train()

    def ours(out: Path, timer) -> None:
        model, qlora = build_model(cfg, log=lambda m: None)
        assert qlora, "the built-in trainer did not take the QLoRA path on CUDA"
        args = training_args(cfg, out, has_eval=False, max_steps=steps, save_strategy="no")
        train_ours(model, args, data, collator, out / "run", "all", timer)

    times: dict[str, list[float]] = {"plain": [], "ours": []}
    memory: dict[str, int] = {}
    for r in range(repeats):
        for kind in (("plain", "ours") if r % 2 == 0 else ("ours", "plain")):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            timer = _step_timer()
            (plain if kind == "plain" else ours)(tmp / f"{kind}-{r}", timer)
            marks = timer.marks
            times[kind] += [b - a for a, b in zip(marks[warmup:], marks[warmup + 1:])]
            memory[kind] = max(memory.get(kind, 0), torch.cuda.max_memory_allocated())
    p, o = statistics.median(times["plain"]), statistics.median(times["ours"])
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__, "hidden": hidden, "layers": layers,
        "params_m": round(sum(x.numel() for x in AutoModelForCausalLM.from_config(
            __import__("transformers").AutoConfig.from_pretrained(str(model_dir))).parameters())
            / 1e6, 1),
        "batch": batch, "grad_accum": accum, "seq": seq, "steps": steps, "repeats": repeats,
        "plain_step_s": round(p, 4), "ours_step_s": round(o, 4),
        "plain_tokens_per_s": round(tokens_per_step / p), "ours_tokens_per_s":
            round(tokens_per_step / o), "ratio_step_time": round(o / p, 3),
        "peak_gpu_mem_gb": {k: round(v / 2**30, 2) for k, v in memory.items()}}
    log(f"bench-qlora on {result['gpu']}: plain {result['plain_tokens_per_s']} tokens/s, "
        f"remoteops {result['ours_tokens_per_s']} tokens/s, step-time ratio "
        f"{result['ratio_step_time']:.3f}")
    if end_to_end:
        result["end_to_end"] = _end_to_end(project, log)
    return result


def _end_to_end(project: Path, log) -> dict[str, Any]:
    """The real agent command: ``remoteops-agent train --stage all`` with QLoRA."""
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "remoteops.agent", "train", "--stage", "all",
                           "--run-dir", str(project / "outputs" / "run_e2e"), "--json"],
                          cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(ROOT), os.environ.get("PYTHONPATH", "")])})
    entry = {}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            entry = json.loads(line)
            break
    adapter = project / "outputs" / "adapter" / "adapter_all"
    out = {"exit": proc.returncode, "seconds": round(time.time() - started, 1),
           "status": entry.get("status"), "qlora": entry.get("qlora"),
           "adapter_files": sorted(p.name for p in adapter.glob("*")) if adapter.is_dir() else [],
           "stderr_tail": proc.stderr.strip().splitlines()[-3:]}
    log(f"end to end: remoteops-agent train (QLoRA) exit {out['exit']}, status "
        f"{out['status']}, {out['seconds']}s, adapter {out['adapter_files']}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--end-to-end", action="store_true",
                    help="Also run remoteops-agent train with QLoRA on the same model.")
    ap.add_argument("--json", default=None, help="Also write the result to this file.")
    a = ap.parse_args(argv)
    result = run_bench(a.steps, a.repeats, hidden=a.hidden, layers=a.layers, batch=a.batch,
                       seq=a.seq, end_to_end=a.end_to_end)
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":  # python -m tests.bench.bench_qlora
    raise SystemExit(main())
