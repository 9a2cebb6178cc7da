"""In-process health watch: a ``transformers.TrainerCallback`` any HF trainer can use.

    from remoteops.trainer.health import HealthCallback
    trainer = Trainer(..., callbacks=[HealthCallback(loss_max=1e4, explode_ratio=10)])

It acts *before* the optimizer applies a bad step: in ``on_pre_optimizer_step``
it checks the gradients (a NaN/inf loss gives NaN gradients), the loss (when
the trainer feeds it through ``observe_loss``, as remoteops' own trainer does)
and the learning rate; on a problem it drops the gradients (so the optimizer
step changes nothing), stops training, and suppresses further saves, so every
saved weight stays finite. Reasons: ``nan``, ``divergence``, ``lr_zero``, and
``stagnation`` (optional: no improvement for ``stagnation_steps`` steps);
``classify_exception`` names ``oom``, ``cuda``, ``data``, ``config``,
``interrupted`` or ``error`` for an exception out of ``trainer.train()``.
Under torchrun every rank judges its own step and the verdicts are agreed (one
all-reduce per step, ``trainer/distributed.agree``): a NaN on one rank stops every rank
before the optimizer step. Set ``logging_nan_inf_filter=False`` in the TrainingArguments: transformers
hides NaN losses otherwise (the callback turns it off when it can).
"""

from __future__ import annotations

from typing import Any, Callable

from transformers import TrainerCallback

from remoteops.common.health import HealthJudge, classify_exception  # noqa: F401 - public here too
from remoteops.trainer.distributed import agree

# fp16 (a GradScaler): steps in a row whose gradients overflow (inf, with a finite non-zero
# loss) that pass, since the scaler skips them itself. Its scale starts at 2**16 and halves
# on each overflow, so 16 in a row reach 1; a few more is a margin.
FP16_OVERFLOW_STEPS = 20

REASONS = ("nan", "divergence", "lr_zero", "stagnation", "oom", "cuda", "data", "config", "interrupted",
           "error")


class HealthFailure(Exception):
    """Raised (by the caller's choice) for a failure the callback found."""

    def __init__(self, reason: str, message: str, step: int):
        super().__init__(message)
        self.reason, self.message, self.step = reason, message, step


class HealthCallback(TrainerCallback):
    """Watches loss, gradients and learning rate; stops before a bad step is applied.

    ``on_healthy(step)`` is called once after ``warmup_check_steps`` clean steps;
    ``on_failure(reason, message, step)`` once on the first problem. The failure
    is also kept in ``self.failure`` (a dict) for the caller.
    """

    def __init__(self, loss_max: float = 1e4, explode_ratio: float = 10.0,
                 warmup_check_steps: int = 3, check_lr: bool = True,
                 stagnation_steps: int = 0, stagnation_min_delta: float = 0.0,
                 on_healthy: Callable[[int], None] | None = None,
                 on_failure: Callable[[str, str, int], None] | None = None,
                 rules: list[Callable[..., tuple[str, str] | None]] | None = None):
        self.health_judge = HealthJudge(loss_max, explode_ratio, check_lr=check_lr,
                                  stagnation_steps=stagnation_steps,
                                  stagnation_min_delta=stagnation_min_delta, rules=rules)
        self.warmup_check_steps = warmup_check_steps
        self.on_healthy = on_healthy
        self.on_failure = on_failure
        self.failure: dict[str, Any] | None = None
        self.healthy = False
        self._start_step = 0
        self._loss_sum = None
        self._loss_fed = False
        self._params: list = []
        self._fp16 = False

    # -- fed by a trainer that wants loss checks before the optimizer step ------
    def observe_loss(self, loss) -> None:
        """Add one micro-batch loss (a tensor; no device sync happens here)."""
        self._loss_fed = True
        loss = loss.detach()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    # -- the checks -------------------------------------------------------------
    def judge(self, step: int, loss: float | None = None, grad_norm: float | None = None,
              lr: float | None = None) -> tuple[str, str] | None:
        """``(reason, message)`` for a bad step, else None (``remoteops.common.health``)."""
        return self.health_judge.judge(step, loss, grad_norm, lr)

    def _fail(self, reason: str, message: str, step: int, control) -> None:
        if self.failure is None:
            self.failure = {"reason": reason, "message": message, "step": step}
            if self.on_failure:
                self.on_failure(reason, message, step)
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    # -- TrainerCallback ----------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "logging_nan_inf_filter", False):
            try:
                args.logging_nan_inf_filter = False
            except Exception:  # frozen arguments: NaN still reaches the gradient check
                pass
        self.health_judge.warmup_steps = (args.get_warmup_steps(state.max_steps)
                                          if state.max_steps else 0)
        self._fp16 = bool(getattr(args, "fp16", False))
        if self._fp16:
            self.health_judge.overflow_steps = max(self.health_judge.overflow_steps,
                                                   FP16_OVERFLOW_STEPS)
        self._start_step = state.global_step  # a resumed run proves itself again
        self.healthy = False
        if model is not None:
            self._params = [p for p in model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        import torch

        step = state.global_step + 1
        if not self._params and model is not None:
            self._params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad for p in self._params if p.grad is not None]
        values = []
        if grads:
            values.append(torch.stack(torch._foreach_norm(grads)).float().sum())
        if self._loss_sum is not None:  # training_step losses are pre-scaled: their sum is the step's
            loss = self._loss_sum.float().reshape(())
            values.append(loss.to(values[0].device) if values else loss)
        numbers = torch.stack(values).tolist() if values else []  # the one device sync per step
        grad_total = numbers[0] if grads else None
        loss_total = numbers[-1] if self._loss_sum is not None else None
        self._loss_sum = None
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
        problem = agree(self.judge(step, loss_total, grad_total, lr))  # every rank, under torchrun
        if problem:
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)  # the step that follows changes nothing
            for p in self._params:
                p.grad = None
            self._fail(problem[0], problem[1], step, control)

    def on_step_end(self, args, state, control, **kwargs):
        if self.failure:
            self._fail(self.failure["reason"], self.failure["message"], self.failure["step"], control)
        elif not self.healthy and state.global_step - self._start_step >= self.warmup_check_steps:
            self.healthy = True
            if self.on_healthy:
                self.on_healthy(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.failure or "loss" not in logs:
            return
        # Without observe_loss the loss is only seen here, after the step.
        loss = logs.get("loss") if not self._loss_fed else None
        # fp16: the logged norm of a step the scaler skipped was judged before that step
        grad_norm = None if self._fp16 else logs.get("grad_norm")
        problem = self.judge(state.global_step, loss, grad_norm, None)
        if problem:
            self._fail(problem[0], problem[1], state.global_step, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.failure:
            self._fail(self.failure["reason"], self.failure["message"], self.failure["step"], control)
