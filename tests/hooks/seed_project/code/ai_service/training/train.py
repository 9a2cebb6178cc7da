"""The seed's training loop, cut down: fits y = w*x + b to data/<stage>.csv by gradient
descent, in plain Python, and reports through remoteops' hooks."""

import json
import math
import sys
import time
from pathlib import Path

from remoteops.hooks import TrainingHooks

ROOT = Path(__file__).resolve().parents[3]


def main(stage: str, lr: float = 0.3, epochs: int = 3, batch: int = 2) -> int:
    lines = (ROOT / "data" / f"{stage}.csv").read_text().split()[1:]
    rows = [tuple(float(v) for v in line.split(",")) for line in lines]
    hooks = TrainingHooks()  # run dir and stage from the environment remoteops sets
    w = b = 0.0
    step = 0
    for epoch in range(epochs):
        for i in range(0, len(rows), batch):
            step += 1
            errors = [(w * x + b - y, x) for x, y in rows[i:i + batch]]
            loss = sum(e * e for e, _ in errors) / len(errors)
            gw = sum(2 * e * x for e, x in errors) / len(errors)
            gb = sum(2 * e for e, _ in errors) / len(errors)
            problem = hooks.check(step, loss=loss, grad_norm=math.hypot(gw, gb), lr=lr)
            if problem:  # <stage>.failed is written; the weights keep their last good values
                print(f"step {step}: stopping, {problem.reason}: {problem.message}", flush=True)
                return 1
            w, b = w - lr * gw, b - lr * gb
            hooks.log_metrics(step, loss=loss, lr=lr, grad_norm=math.hypot(gw, gb), epoch=epoch)
            print(f"epoch {epoch} step {step} loss {loss:.4f}", flush=True)
            time.sleep(0.1)
    out = ROOT / "outputs" / "adapter" / f"adapter_{stage}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "weights.json").write_text(json.dumps({"w": w, "b": b}) + "\n")
    hooks.mark_done({"loss": loss, "w": w, "b": b})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
