"""Trainer callbacks besides health: metrics rows and checkpoint reports."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from remoteops.common.sizes import human_size
from remoteops.trainer.checkpoints import dir_size
from remoteops.common.rundir import RunDir


class MetricsCallback(TrainerCallback):
    """Appends each log (train or eval) to ``metrics.csv``; keeps the heartbeat's step."""

    def __init__(self, run: RunDir, token_counter=None, extra=None):
        self.run = run
        self.counter = token_counter
        self.extra = extra  # () -> more columns of a train row (a live dataset's size)
        self._t0 = time.time()
        self._last_t = self._t0
        self._last_tokens = 0
        self.last: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_t = time.time()
        self._last_tokens = self.counter.tokens if self.counter else 0

    def on_step_end(self, args, state, control, **kwargs):
        self.run.step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        now = time.time()
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
               "time": round(now - self._t0, 3)}
        if "loss" in logs:
            tokens = self.counter.tokens if self.counter else 0
            dt = now - self._last_t
            row.update(loss=logs["loss"], lr=logs.get("learning_rate"),
                       grad_norm=logs.get("grad_norm"),
                       tokens_per_s=round((tokens - self._last_tokens) / dt, 1) if dt > 0 else None)
            self._last_t, self._last_tokens = now, tokens
            if self.extra is not None:
                row.update(self.extra())
            self.last.update(loss=logs["loss"], step=state.global_step, epoch=state.epoch)
        elif "eval_loss" in logs:
            row["eval_loss"] = logs["eval_loss"]
            self.last.update(eval_loss=logs["eval_loss"])
        else:
            return
        self.run.append_metrics(row)


class CheckpointReporter(TrainerCallback):
    """Prints every checkpoint the trainer saves, with its size and why it was kept."""

    def __init__(self, say: Callable[[str], None], on_saved: Callable[[dict], None] | None = None):
        self.say = say
        self.on_saved = on_saved

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not path.is_dir():
            return
        why = [f"epoch {state.epoch:.2f}".rstrip("0").rstrip(".") if state.epoch else "step",
               "latest (with optimizer, scheduler and RNG state)"]
        eval_loss = None
        for entry in reversed(state.log_history):
            if "eval_loss" in entry:
                eval_loss = entry["eval_loss"]
                break
        if state.best_model_checkpoint and Path(state.best_model_checkpoint).name == path.name:
            why.insert(1, f"best so far (eval_loss {eval_loss:.4f})" if eval_loss is not None
                       else "best so far")
        size = dir_size(path)
        self.say(f"checkpoint saved: {path} ({human_size(size, 'binary')}): {', '.join(why)}")
        if self.on_saved:
            self.on_saved({"path": str(path), "step": state.global_step, "size": size,
                           "why": why, "eval_loss": eval_loss})
