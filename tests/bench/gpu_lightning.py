"""The Lightning callback on a real GPU: fp32, bf16-mixed and 16-mixed (GradScaler)."""
import json, sys, tempfile, time
from pathlib import Path
import torch
import pytorch_lightning as pl
sys.path.insert(0, ".")
from remoteops.trainer.lightning import LightningHealthCallback


class Tiny(pl.LightningModule):
    def __init__(self, nan_at=None):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        if self.nan_at is not None and self.global_step + 1 == self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def fit(precision, nan_at, steps=20):
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32)
    run = tmp / "run"
    cb = LightningHealthCallback(run_dir=run, stage="s")
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp / "ck", every_n_train_steps=1, save_top_k=-1)
    m = Tiny(nan_at)
    t = pl.Trainer(max_steps=steps, accelerator="gpu", devices=1, precision=precision, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, ck])
    t0 = time.time()
    t.fit(m, loader)
    finite = all(bool(torch.isfinite(p).all()) for p in m.parameters())
    saved = sorted((tmp / "ck").glob("*.ckpt"))
    saved_finite = all(all(bool(torch.isfinite(v).all()) for v in torch.load(p, map_location="cpu", weights_only=False)["state_dict"].values()) for p in saved)
    failed = json.loads((run / "s.failed.json").read_text()) if (run / "s.failed.json").exists() else None
    scaler = getattr(t.precision_plugin, "scaler", None)
    print(json.dumps({"precision": precision, "nan_at": nan_at, "global_step": t.global_step,
                      "failed": failed and (failed["reason"], failed["step"], failed["message"]),
                      "done": (run / "s.done").exists(), "healthy": (run / "s.healthy").exists(),
                      "weights_finite": finite, "saved": len(saved), "saved_finite": saved_finite,
                      "scale": scaler.get_scale() if scaler else None,
                      "device": str(next(m.parameters()).device), "s": round(time.time() - t0, 2)}), flush=True)


print(torch.__version__, pl.__version__, torch.cuda.get_device_name(0), flush=True)
for precision in ("32", "bf16-mixed", "16-mixed"):
    fit(precision, None)
    fit(precision, 3)
