"""The live path's overhead: the same N chat samples trained once as a fixed dataset and
once as a complete live set (tiny demo model, CPU, epochs 1, batch 2 x accum 2), runs
interleaved. Run: ``python -m tests.bench.bench_live_trainer [N] [repeats]``."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def main(n: int = 96, repeats: int = 2) -> list[tuple[str, float, int]]:
    from remoteops.common.config import load_settings
    from remoteops.trainer.demo_model import build_demo_model
    from remoteops.trainer.stageconf import resolve_stage
    from remoteops.trainer.train import run_train
    from tests.live.conftest import Producer, chat_line, make_live_project

    tmp = Path(tempfile.mkdtemp(prefix="bench-live-"))
    model = build_demo_model(tmp / "model", seed=0, hidden_size=64, vocab_size=400)
    root = make_live_project(tmp / "proj", model, min_samples=4)
    producer = Producer(root, tmp / "work")
    producer.deliver(0, n)
    producer.done()
    (root / "data" / "fixed.jsonl").write_bytes(b"".join(chat_line(i) for i in range(n)))
    with open(root / "remoteops.toml", "a", encoding="utf-8") as fh:
        fh.write('\n[stages.fixed]\ndataset = "data/fixed.jsonl"\n[stages.fixed.train]\n'
                 'epochs = 1\nbatch_size = 2\ngrad_accum = 2\nmax_seq_len = 96\nlora_r = 4\n'
                 'lora_targets = ["q_proj", "v_proj"]\neval_holdout = 0.0\n')
    settings = load_settings(root, env={"REMOTEOPS_USER_CONFIG": str(root / "none.toml")})
    rows = []
    for rep in range(repeats):
        for stage in ("fixed", "live"):
            t0 = time.time()
            entry = run_train(resolve_stage(settings, stage), root / f"run_{stage}_{rep}",
                              log=lambda message: None)
            seconds = round(time.time() - t0, 2)
            rows.append((stage, seconds, entry["final"].get("step")))
            print(f"{stage:5} run {rep + 1}: {entry['status']}, {entry['final'].get('step')} "
                  f"steps in {seconds} s", flush=True)
    return rows


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
