"""The health rules every watch applies (pure Python, no torch).

One ``HealthJudge`` per training run: the built-in trainer's ``HealthCallback``,
``remoteops.hooks.TrainingHooks`` (any trainer, the Lightning callback) and the log watch
of command stages all ask it about each step, so a step is judged the same wherever it is
seen. Reasons: ``nan`` (NaN/inf loss or gradient norm), ``divergence`` (a loss above
``loss_max``, or over ``explode_ratio`` times the lowest so far), ``lr_zero`` (after the
warmup), ``stagnation`` (optional), and whatever a ``health_rules`` plugin returns.
``classify_exception`` names the class of an exception that ended training.
"""

from __future__ import annotations

import math
from typing import Any, Callable

Rule = Callable[..., "tuple[str, str] | None"]

_CUDA_MARKERS = ("cuda error", "cublas", "cudnn", "nccl", "device-side assert",
                 "illegal memory access", "cuda driver", "cuda runtime", "no kernel image")


def run_rules(rules: list[Rule], step: int, loss: float | None = None,
              grad_norm: float | None = None, lr: float | None = None) -> tuple[str, str] | None:
    """The first ``(reason, message)`` a ``health_rules`` plugin's rule returns, else None."""
    for rule in rules:
        found = rule(step=step, loss=loss, grad_norm=grad_norm, lr=lr)
        if found:
            reason, message = found
            return str(reason), str(message)
    return None


class HealthJudge:
    """Judges one run's steps in order; it remembers the lowest loss and the stagnation count."""

    def __init__(self, loss_max: float = 1e4, explode_ratio: float = 10.0,
                 check_lr: bool = True, warmup_steps: int = 0, stagnation_steps: int = 0,
                 stagnation_min_delta: float = 0.0, rules: list[Rule] | None = None,
                 overflow_steps: int = 0):
        self.loss_max = loss_max
        self.explode_ratio = explode_ratio
        self.check_lr = check_lr
        self.warmup_steps = warmup_steps
        self.stagnation_steps = stagnation_steps  # 0: off
        self.stagnation_min_delta = stagnation_min_delta
        self.rules = list(rules or [])
        # steps in a row with an infinite gradient norm and a finite, non-zero loss that pass:
        # an fp16 loss scaler skips such a step and lowers its scale (0: none pass)
        self.overflow_steps = overflow_steps
        self._overflows = 0
        self.min_loss = math.inf
        self._since_best = 0

    @classmethod
    def from_settings(cls, health: dict[str, Any], rules: list[Rule] | None = None,
                      **extra: Any) -> "HealthJudge":
        """From a ``[health]`` table (``HEALTH_DEFAULTS`` keys)."""
        return cls(loss_max=float(health["loss_max"]), explode_ratio=float(health["explode_ratio"]),
                   stagnation_steps=int(health.get("stagnation_steps", 0)),
                   stagnation_min_delta=float(health.get("stagnation_min_delta", 0.0)),
                   rules=rules, **extra)

    def judge(self, step: int, loss: float | None = None, grad_norm: float | None = None,
              lr: float | None = None) -> tuple[str, str] | None:
        """``(reason, message)`` for a bad step, else None."""
        if loss is not None and not math.isfinite(loss):
            return "nan", f"loss is {loss} at step {step}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            if self._overflow_passes(grad_norm, loss):
                grad_norm = None  # judged on its loss alone
            else:
                return "nan", self._grad_message(grad_norm, step)
        else:
            self._overflows = 0
        if loss is not None:
            if loss > self.loss_max:
                return "divergence", (f"loss {loss:.4g} at step {step} is above health.loss_max "
                                      f"({self.loss_max:g})")
            if (math.isfinite(self.min_loss) and loss > self.explode_ratio * self.min_loss
                    and loss - self.min_loss > 1.0):
                return "divergence", (f"loss {loss:.4g} at step {step} is over "
                                      f"{self.explode_ratio:g}x the lowest so far "
                                      f"({self.min_loss:.4g})")
            if loss < self.min_loss - self.stagnation_min_delta or not math.isfinite(self.min_loss):
                self._since_best = 0
            else:
                self._since_best += 1
            self.min_loss = min(self.min_loss, loss)
            if self.stagnation_steps and self._since_best >= self.stagnation_steps:
                return "stagnation", (f"loss has not improved on {self.min_loss:.4g} for "
                                      f"{self._since_best} steps (health.stagnation_steps); "
                                      "check the learning rate and the data")
        if self.check_lr and lr is not None and lr <= 0 and step > self.warmup_steps:
            return "lr_zero", (f"learning rate is {lr} at step {step}, after "
                               f"{self.warmup_steps} warmup steps; check train.lr and the schedule")
        if self.rules:
            return run_rules(self.rules, step, loss, grad_norm, lr)
        return None


    def _overflow_passes(self, grad_norm: float, loss: float | None) -> bool:
        overflow = math.isinf(grad_norm) and loss is not None and math.isfinite(loss) and loss != 0
        self._overflows = self._overflows + 1 if overflow else 0
        return overflow and self._overflows <= self.overflow_steps

    def _grad_message(self, grad_norm: float, step: int) -> str:
        message = f"gradient norm is {grad_norm} at step {step}"
        if self._overflows > self.overflow_steps > 0:
            message += (f", {self._overflows} steps in a row (more than the "
                        f"{self.overflow_steps} an fp16 loss scaler may skip)")
        return message


def classify_exception(exc: BaseException) -> str:
    """The failure class of an exception raised by training."""
    from remoteops.common.errors import ConfigError

    name = type(exc).__name__
    text = str(exc).lower()
    if name == "OutOfMemoryError" or "out of memory" in text:
        return "oom"
    if any(marker in text for marker in _CUDA_MARKERS) or name.startswith("Cuda"):
        return "cuda"
    if isinstance(exc, ConfigError):
        return "data" if type(exc).__name__ == "DataError" else "config"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return "error"


__all__ = ["HealthJudge", "run_rules", "classify_exception"]
