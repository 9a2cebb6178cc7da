"""The health watch for PyTorch Lightning: stops before a NaN reaches the weights.

    from remoteops.trainer.lightning import LightningHealthCallback
    trainer = pl.Trainer(..., callbacks=[LightningHealthCallback()])

It works through ``remoteops.hooks.TrainingHooks`` (run dir and stage from the stage's
environment, the project's ``[health]`` settings and ``health_rules`` plugins), like the
HF ``HealthCallback``: ``on_before_backward`` adds up the step's micro-batch losses,
``on_before_optimizer_step`` (inside the optimizer's closure, after the backward pass,
before the update) judges loss, gradient norm and learning rate in one device sync. On a
problem it drops every gradient, so the optimizer step that follows changes nothing, and
sets ``trainer.should_stop``; every later step is dropped too, so whatever is saved
afterwards holds the last good weights. ``<stage>.failed`` carries the reason. Each step
goes to ``metrics.csv``; ``<stage>.healthy`` follows ``health.warmup_check_steps`` clean
steps, ``<stage>.done`` the end of ``fit`` (``mark_done=False`` leaves that to you), and
an exception out of ``fit`` is classified (``oom``, ``cuda``, ``interrupted``, ``error``).

With a fp16 ``GradScaler`` (``precision="16-mixed"``) an inf gradient norm with a finite
loss is the scaler's business (it skips that step), not a failure.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

try:  # the package name of Lightning 2.x, then its unified "lightning" package
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - one of the two is installed
    import lightning.pytorch as pl

from remoteops.common.health import classify_exception
from remoteops.hooks import TrainingHooks


class LightningHealthCallback(pl.Callback):
    """Checks each optimizer step before it is applied; see the module's docstring."""

    def __init__(self, hooks: TrainingHooks | None = None, mark_done: bool = True,
                 warmup_steps: int = 1, heartbeat_seconds: float = 5.0, **hooks_kwargs: Any):
        # warmup_steps: a warmup that starts at lr 0 is not "lr stuck at 0"
        self.hooks = hooks or TrainingHooks(warmup_steps=warmup_steps, **hooks_kwargs)
        self.mark_done = mark_done
        self.heartbeat_seconds = heartbeat_seconds
        self._loss: torch.Tensor | None = None
        self._params: list[torch.nn.Parameter] = []
        self._row: dict[str, Any] | None = None
        self._beat_at = 0.0
        self._last_loss: float | None = None

    @property
    def failure(self):
        """The ``remoteops.hooks.Problem`` that stopped training, or None."""
        return self.hooks.failure

    def on_train_start(self, trainer, pl_module) -> None:
        self._params = [p for p in pl_module.parameters() if p.requires_grad]

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        loss = loss.detach().float().reshape(())
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # 16-mixed: Lightning hands the hook the loss times the scale
            scale = getattr(scaler, "_scale", None)  # on the device: no sync here
            loss = loss / (scale.to(loss.device).float().reshape(())
                           if isinstance(scale, torch.Tensor) else float(scaler.get_scale()))
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step + 1
        grads = [p.grad for p in self._params if p.grad is not None]
        values = []
        if grads:
            values.append(torch.linalg.vector_norm(
                torch.stack([g.float() for g in torch._foreach_norm(grads)])))
        if self._loss is not None:
            values.append(self._loss.to(values[0].device) if values else self._loss)
        numbers = torch.stack(values).tolist() if values else []  # the one device sync
        grad_norm = numbers[0] if grads else None
        loss = numbers[-1] if self._loss is not None else None
        self._loss = None
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        if getattr(trainer.precision_plugin, "scaler", None) is not None and loss is not None \
                and math.isfinite(loss):
            grad_norm = None  # an fp16 overflow: the scaler skips this step itself
        problem = self.hooks.check(step, loss=loss, grad_norm=grad_norm, lr=lr)
        if problem is not None:
            for p in self._params:
                p.grad = None  # the update that follows changes nothing
            trainer.should_stop = True
            self._row = None
            return
        self._last_loss = loss
        self._row = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                     "epoch": trainer.current_epoch}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._row is not None:
            row, self._row = self._row, None
            self.hooks.log_metrics(**row)
        if self.hooks.failure is not None:
            trainer.should_stop = True
        if time.monotonic() - self._beat_at >= self.heartbeat_seconds:
            self._beat_at = time.monotonic()
            self.hooks.beat(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.mark_done and self.hooks.failure is None:
            self.hooks.mark_done({"step": trainer.global_step, "loss": self._last_loss})

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.hooks.failure is None:
            self.hooks.mark_failed(classify_exception(exception),
                                   f"{type(exception).__name__}: {exception}",
                                   step=trainer.global_step + 1)


__all__ = ["LightningHealthCallback"]
