"""Overhead of remoteops' trainer over a plain ``transformers.Trainer`` (``invoke bench-trainer``).

Both train the same tiny model on the same data with the same
TrainingArguments; ours adds the health watch (with its pre-step loss and
gradient checks), metrics.csv rows, the heartbeat thread and checkpoint
reports. Runs are interleaved (ABBA...) so machine noise hits both alike; the
result is the ratio of median step times (target <= 1.03).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    return StepTimer()


def train_ours(model, args, data, collator, run_path: Path, stage: str, timer) -> None:
    """Train with the built-in trainer's own pieces: our Trainer subclass with the health
    watch, metrics.csv, checkpoint reports and the heartbeat (bench-trainer, bench-qlora)."""
    from transformers import PrinterCallback

    from remoteops.common.rundir import RunDir
    from remoteops.trainer.callbacks import CheckpointReporter, MetricsCallback
    from remoteops.trainer.health import HealthCallback
    from remoteops.trainer.train import _trainer_class

    run = RunDir(run_path, stage)
    health = HealthCallback()
    run.start_heartbeat(5.0)
    try:
        trainer = _trainer_class()(
            model=model, args=args, train_dataset=data, data_collator=collator, health=health,
            callbacks=[health, MetricsCallback(run, collator), CheckpointReporter(lambda m: None),
                       timer])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    finally:
        run.stop_heartbeat()
    assert health.failure is None, health.failure


def run_bench(steps: int = 40, repeats: int = 3, warmup_steps: int = 5, model_dir: str | Path | None = None,
              grad_accum: int = 2, max_seq_len: int = 256, threads: int | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``steps`` optimizer steps per run, ``repeats`` runs each; return timings and ratio."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PrinterCallback, Trainer, TrainingArguments

    from remoteops.trainer.data import Collator, encode, read_jsonl
    from remoteops.trainer.demo_model import DEMO_DIR, build_demo_model
    from remoteops.trainer.train import load_tokenizer, quiet_transformers

    quiet_transformers()
    if threads:
        torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="remoteops-bench-"))
    model_dir = Path(model_dir) if model_dir else build_demo_model(tmp / "model", seed=0)
    tok = load_tokenizer(model_dir)
    records = read_jsonl(DEMO_DIR / "data" / "all.jsonl").records
    data = [encode(tok, r.messages, max_seq_len) for r in records]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def one(kind: str, index: int) -> list[float]:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                target_modules=targets, task_type="CAUSAL_LM"))
        out = tmp / f"{kind}-{index}"
        args = TrainingArguments(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=1,
            gradient_accumulation_steps=grad_accum, learning_rate=1e-3, logging_steps=1,
            logging_nan_inf_filter=False, save_strategy="no", eval_strategy="no",
            report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
            remove_unused_columns=False, seed=0, optim="adamw_torch")
        timer = _step_timer()
        collator = Collator(tok.pad_token_id)
        if kind == "plain":
            trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                              callbacks=[timer])
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        else:
            train_ours(model, args, data, collator, out / "run", "bench", timer)
        marks = timer.marks
        return [b - a for a, b in zip(marks[warmup_steps:], marks[warmup_steps + 1:])]

    times: dict[str, list[float]] = {"plain": [], "ours": []}
    started = time.time()
    for r in range(repeats):
        order = ("plain", "ours") if r % 2 == 0 else ("ours", "plain")
        for kind in order:
            times[kind].extend(one(kind, r))
    plain, ours = statistics.median(times["plain"]), statistics.median(times["ours"])
    result = {"steps": steps, "repeats": repeats, "grad_accum": grad_accum,
              "threads": torch.get_num_threads(),
              "device": "cuda" if torch.cuda.is_available() else "cpu",
              "plain_step_s": plain, "ours_step_s": ours, "ratio": ours / plain,
              "plain_mean_s": statistics.mean(times["plain"]),
              "ours_mean_s": statistics.mean(times["ours"]),
              "target": 1.03, "wall_s": round(time.time() - started, 1)}
    result["pass"] = result["ratio"] <= result["target"]
    log(f"bench-trainer: plain {plain * 1000:.1f} ms/step, remoteops {ours * 1000:.1f} ms/step, "
        f"ratio {result['ratio']:.3f} (target <= 1.03): {'pass' if result['pass'] else 'miss'}")
    return result


if __name__ == "__main__":  # python -m tests.bench.bench_trainer
    import json
    print(json.dumps(run_bench(), indent=2))
