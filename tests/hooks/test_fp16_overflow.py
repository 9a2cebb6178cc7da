"""The built-in trainer's HealthCallback under fp16 (a GradScaler): an overflowing step is the
scaler's to skip, not a failure; NaN, and overflow that goes on, still stop before the update.

fp16 training needs a GPU, so ``args`` is a stand-in for fp16 TrainingArguments (mocked: no
GPU here); the gradients, the callback and the judge are real.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")


def _step(callback, model, step: int, grad: float, loss: float = 1.5):
    for p in model.parameters():
        p.grad = torch.full_like(p, grad)
    callback.observe_loss(torch.tensor(loss))
    control = SimpleNamespace(should_training_stop=False, should_save=True, should_evaluate=False)
    callback.on_pre_optimizer_step(None, SimpleNamespace(global_step=step - 1), control,
                                   model=model, optimizer=None)
    return control.should_training_stop


def _begin(fp16: bool):
    from remoteops.trainer.health import HealthCallback

    model = torch.nn.Linear(4, 2)
    callback = HealthCallback()
    args = SimpleNamespace(fp16=fp16, logging_nan_inf_filter=False, get_warmup_steps=lambda n: 0)
    callback.on_train_begin(args, SimpleNamespace(global_step=0, max_steps=0),
                            SimpleNamespace(), model=model)
    return callback, model


def test_fp16_stand_in_args_overflow_passes_until_it_goes_on_too_long():
    from remoteops.trainer.health import FP16_OVERFLOW_STEPS

    callback, model = _begin(fp16=True)
    for step in range(1, FP16_OVERFLOW_STEPS + 1):
        assert not _step(callback, model, step, float("inf")), f"stopped at step {step}"
    assert not _step(callback, model, FP16_OVERFLOW_STEPS + 1, 0.1)  # the scale fits again
    for step in range(FP16_OVERFLOW_STEPS + 2, 2 * FP16_OVERFLOW_STEPS + 2):
        assert not _step(callback, model, step, float("inf"))
    assert _step(callback, model, 2 * FP16_OVERFLOW_STEPS + 2, float("inf"))
    assert callback.failure["reason"] == "nan"
    assert f"{FP16_OVERFLOW_STEPS + 1} steps in a row" in callback.failure["message"]
    assert all(p.grad is None for p in model.parameters())  # the update changes nothing


def test_fp16_stand_in_args_nan_or_a_zero_loss_stops_at_once_and_fp32_stops_on_inf():
    callback, model = _begin(fp16=True)
    assert _step(callback, model, 1, float("nan"))
    callback, model = _begin(fp16=True)
    assert _step(callback, model, 1, float("inf"), loss=0.0)
    callback, model = _begin(fp16=False)
    assert _step(callback, model, 1, float("inf"))
    assert callback.failure["message"] == "gradient norm is inf at step 1"
