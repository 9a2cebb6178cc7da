"""The Lightning callback on a real pytorch-lightning tiny model on the CPU: a NaN loss never
reaches the weights (every saved checkpoint stays finite) and <stage>.failed says why."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("pytorch_lightning")

from remoteops.trainer.lightning import LightningHealthCallback  # noqa: E402


class Tiny(pl.LightningModule):
    """y = Wx + b on random data; the loss of step ``nan_at`` is multiplied by NaN."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if self.nan_at is not None and self.global_step + 1 == self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)


def _fit(tmp_path: Path, model: Tiny, steps: int = 6, plugins=None):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    run = tmp_path / "outputs" / "training_sync" / "run_x"
    health = LightningHealthCallback(run_dir=run, stage="writing")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1,
                                        save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[health, ckpt], default_root_dir=tmp_path,
                         plugins=plugins)
    trainer.fit(model, loader)
    return trainer, health, run


def test_a_nan_step_is_dropped_training_stops_and_every_saved_weight_is_finite(tmp_path):
    model = Tiny(nan_at=3)
    trainer, health, run = _fit(tmp_path, model)
    failed = json.loads((run / "writing.failed.json").read_text())
    assert failed["reason"] == "nan" and failed["step"] == 3, failed
    assert "loss is nan at step 3" in failed["message"]
    assert (run / "writing.failed").read_text() == "nan\n"
    assert not (run / "writing.done").exists()
    assert health.failure.reason == "nan"
    assert trainer.global_step <= 3  # stopped at the bad step, not after 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert saved, "the checkpoint callback saved nothing"
    for path in saved:
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values()), path.name
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["step"] for r in rows] == ["1", "2"] and all(r["stage"] == "writing" for r in rows)


def test_a_clean_run_is_marked_healthy_then_done_with_its_metrics(tmp_path):
    trainer, health, run = _fit(tmp_path, Tiny(), steps=5)
    assert trainer.global_step == 5 and health.failure is None
    healthy = json.loads((run / "writing.healthy.json").read_text())
    assert healthy["step"] == 3 and healthy["reason"] == "warmup check passed"
    done = json.loads((run / "writing.done.json").read_text())
    assert done["final"]["step"] == 5 and done["final"]["loss"] > 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert all(float(r["grad_norm"]) > 0 and float(r["lr"]) == 0.05 for r in rows)


@pytest.mark.parametrize("nan_at", [None, 3])
def test_under_a_grad_scaler_the_loss_is_judged_unscaled(tmp_path, nan_at):
    """16-mixed hands on_before_backward the loss times the scaler's scale (65536 at first):
    the callback must judge the real loss. Found on an H100 (16-mixed stopped step 1 as a
    divergence); here the same Lightning path runs with torch's CPU GradScaler."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    trainer, health, run = _fit(tmp_path, Tiny(nan_at=nan_at), steps=5,
                                plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    if nan_at is None:
        assert health.failure is None and trainer.global_step == 5
        rows = list(csv.DictReader(open(run / "metrics.csv")))
        assert len(rows) == 5 and all(0 < float(r["loss"]) < 100 for r in rows)
    else:
        failed = json.loads((run / "writing.failed.json").read_text())
        assert (failed["reason"], failed["step"]) == ("nan", 3), failed
