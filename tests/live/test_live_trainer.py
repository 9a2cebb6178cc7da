"""The built-in trainer on a live dataset (tiny demo model, CPU): it waits for
min_samples, grows as batches arrive through the real receive path, trains each sample
once per epoch, and a resume after kill -9 continues with exactly the untrained records."""

from __future__ import annotations

import csv
import json
import threading
from collections import Counter
from pathlib import Path

import pytest

from remoteops.common.config import load_settings
from remoteops.common.live_status import read_status
from remoteops.trainer.data import DataError
from remoteops.trainer.stageconf import resolve_stage
from tests.harness.waits import wait_for
from tests.live.conftest import Producer, agent, consumed, make_live_project


def _cfg(root: Path):
    settings = load_settings(root, env={"REMOTEOPS_USER_CONFIG": str(root / "none.toml")})
    return resolve_stage(settings, "live")


def _waiting(run: Path) -> bool:
    return bool((read_status(run, "live") or {}).get("waiting"))


def _more(run: Path, samples: int) -> bool:
    """The trainer trained all it has and waits for more, with ``samples`` in the set."""
    line = (read_status(run, "live") or {}).get("line", "")
    return line.startswith(f"waiting for more data ({samples} samples")


def test_starts_at_min_samples_grows_and_trains_exactly_the_delivered_set(tmp_path, demo_model):
    from remoteops.trainer.train import run_train

    root = make_live_project(tmp_path / "proj", demo_model, min_samples=4)
    prod, run = Producer(root, tmp_path / "work"), root / "run"
    lines: list[str] = []
    since: list[float] = []  # when each wait began, as the status file says

    def waited() -> None:
        wait_for(lambda: (read_status(run, "live") or {}).get("since"), 10, "the wait's start")
        since.append(read_status(run, "live")["since"])

    def produce():
        prod.deliver(0, 2)
        wait_for(lambda: any("waiting for data 2/4" in l for l in lines), 30, "the wait")
        waited()
        prod.deliver(2, 3)
        wait_for(lambda: any("more data (5 samples" in l for l in lines), 60, "a wait at 5")
        waited()
        prod.deliver(5, 4)
        wait_for(lambda: any("more data (9 samples" in l for l in lines), 60, "a wait at 9")
        prod.deliver(9, 3)
        prod.done()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    entry = run_train(_cfg(root), run, log=lines.append)
    thread.join(10)
    assert entry["status"] == "done", entry
    assert "waiting for data 2/4" in lines
    ids = [c["id"] for c in consumed(run)]
    assert Counter(ids) == {sid: 1 for sid in prod.sent} and len(prod.sent) == 12
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    sizes = [int(r["samples"]) for r in rows if r["loss"]]
    assert sizes == sorted(sizes) and sizes[0] == 5 and sizes[-1] == 12
    assert int(rows[-1]["seen"]) == 12
    live = entry["live"]
    assert live["samples"] == 12 and live["records_trained"] == 12 and live["complete"]
    assert [g["samples"] for g in live["growth"]] == sorted({9, 12})
    assert any(l.startswith("data grew: 5 -> 9 samples at step") for l in lines)
    assert (root / "outputs/adapter/adapter_live/adapter_config.json").is_file()
    status = read_status(run, "live")
    assert status["waiting"] is False and status["trained"] == 12 and status["since"] is None
    assert len(since) == 2 and since[0] < since[1]  # each wait has its own start


def test_resume_after_kill_continues_with_exactly_the_untrained_records(tmp_path, demo_model):
    root = make_live_project(tmp_path / "proj", demo_model, min_samples=6)
    with open(root / "remoteops.toml", "a") as fh:
        fh.write('inject_fault = "kill@4"\n')     # SIGKILL as step 4 starts (first run only)
    prod, run = Producer(root, tmp_path / "work"), root / "run"
    prod.deliver(0, 6)
    first = agent(root, "train", "--stage", "live", "--run-dir", str(run))
    try:
        wait_for(lambda: _more(run, 6) and len(consumed(run)) == 4, 90, "step 1, then a wait")
        prod.deliver(6, 6)                          # joins mid-run: checkpoint-2 marks it
        wait_for(lambda: _more(run, 12) and len(consumed(run)) == 12, 60, "steps 2-3")
        prod.deliver(12, 4)
        out = first.communicate(timeout=60)[0]
    finally:
        first.kill()
    assert first.returncode == -9, out
    before = consumed(run)
    assert len(before) == 12                        # steps 1-3 trained; step 4 died
    assert (run / "checkpoints/live/checkpoint-2").is_dir()
    assert not (run / "checkpoints/live/checkpoint-3").exists()

    second = agent(root, "train", "--stage", "live", "--run-dir", str(run), "--resume")
    try:
        wait_for(lambda: _more(run, 16) and len(consumed(run)) == 16, 90, "the resumed run")
        prod.done()
        out = second.communicate(timeout=60)[0]
    finally:
        second.kill()
    assert second.returncode == 0, out
    assert "resuming after 8 trained records" in out
    after = consumed(run)
    assert after[:8] == before[:8]                  # the checkpoint's records, kept
    ids = [c["id"] for c in after]
    assert Counter(ids) == {sid: 1 for sid in prod.sent} and len(ids) == 16
    # the resumed run trained exactly what checkpoint-2 had not
    assert sorted(ids[8:]) == sorted(set(prod.sent) - {c["id"] for c in before[:8]})
    summary = json.loads((run / "summary.json").read_text())["stages"]["live"]
    assert summary["status"] == "done" and summary["live"]["records_trained"] == 16
    assert summary["live"]["growth"] == [{"step": 2, "samples": 12}, {"step": 4, "samples": 16}]


def test_max_steps_ends_a_stage_whose_set_stays_open(tmp_path, demo_model):
    from remoteops.trainer.train import run_train

    root = make_live_project(tmp_path / "proj", demo_model, min_samples=4,
                             extra="max_steps = 2\ngrow_every_steps = 1\n")
    prod, run = Producer(root, tmp_path / "work"), root / "run"
    prod.deliver(0, 6)
    lines: list[str] = []

    def produce():
        wait_for(lambda: any("more data (6 samples" in l for l in lines), 60, "a wait")
        prod.deliver(6, 4)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    entry = run_train(_cfg(root), run, log=lines.append)
    thread.join(10)
    assert entry["status"] == "done", entry
    assert "live data: stopping at max_steps = 2" in lines
    assert len(consumed(run)) == 8 and not entry["live"]["complete"]
    assert read_status(run, "live")["line"].startswith("trained 8 records of 10 samples")

    # a resume over a trained sample whose bytes changed since is refused as a data error
    manifest = root / "data/live/.manifest.jsonl"
    rows = [json.loads(l) for l in manifest.read_text().splitlines()]
    rows[0]["sha256"] = "0" * 64
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint = run / "checkpoints/live/checkpoint-2"
    assert checkpoint.is_dir()
    with pytest.raises(DataError, match="changed in .* since"):
        run_train(_cfg(root), run, resume=checkpoint, log=lines.append)
    failed = json.loads((run / "live.failed.json").read_text())
    assert failed["reason"] == "data"


def test_a_dry_run_checks_what_the_live_set_holds_now(tmp_path, demo_model):
    from remoteops.trainer.train import dry_run

    root = make_live_project(tmp_path / "proj", demo_model, min_samples=50)
    lines: list[str] = []
    with pytest.raises(DataError, match="holds no samples yet"):
        dry_run(_cfg(root), log=lines.append)
    Producer(root, tmp_path / "work").deliver(0, 3)
    info = dry_run(_cfg(root), log=lines.append)
    assert info["samples"] == 3 and info["total_steps"] == 1
    assert any(l.startswith("live set ") and "3 samples now (the stage starts at 50), open"
               in l for l in lines)
