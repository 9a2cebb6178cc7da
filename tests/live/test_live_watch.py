"""The runner's health window does not run out while a live stage waits for data, and
status shows the wait: the files the trainer writes, read as the runner and agent do."""

from __future__ import annotations

import re
import time

from remoteops.common.live_status import write_status
from remoteops.server.stagewatch import StageWatch


def test_the_health_window_starts_when_the_wait_ends(tmp_path):
    stage = {"name": "live", "warnings": []}
    watch = StageWatch(tmp_path, stage, window_s=0.3)
    watch.start(tmp_path / "live.log", 0)
    write_status(tmp_path, "live", line="waiting for data 3/50", waiting=True)
    time.sleep(0.5)
    assert watch.poll() is None and "health" not in stage   # waited longer than the window
    write_status(tmp_path, "live", line="training on 50 samples", waiting=False)
    watch.poll()
    assert "health" not in stage                            # the window starts now
    time.sleep(0.4)
    watch.poll()
    assert stage["health"]["status"] == "healthy"
    assert "health window passed" in stage["health"]["how"]


def test_the_follower_prints_a_wait_and_its_end_once(capsys):
    from remoteops.laptop.remote_train_cli import _current_line, _PlainFollower

    follow = _PlainFollower()

    def data(line: str) -> dict:
        return {"status": "running", "stages": [{"name": "live", "status": "running"}],
                "current": {"stage": "live", "attempt": 1, "data": {"line": line}}}

    for line in ("waiting for data 3/8", "waiting for data 3/8", "waiting for data 6/8",
                 "training on 9 samples: 4 records trained, round 1",
                 "training on 9 samples: 8 records trained, round 1"):
        follow(data(line), "")
    out = capsys.readouterr().out
    assert out.count("waiting for data 3/8") == 1 and "waiting for data 6/8" in out
    assert out.count("training on 9 samples") == 1
    assert _current_line(data("waiting for data 3/8")) == "stage live  waiting for data 3/8"


def test_status_says_how_long_a_wait_has_lasted_on_the_servers_clock(tmp_path):
    from remoteops.laptop.remote_train_cli import _current_line
    from remoteops.server.agent.pipeline_commands import _current

    state = {"stages": [{"name": "live", "status": "running", "attempt": 1}]}
    write_status(tmp_path, "live", line="waiting for data 3/8", waiting=True,
                 since=time.time() - 65)
    cur = _current(tmp_path, state)
    assert 65 <= cur["data"]["waiting_s"] < 75
    line = _current_line({"current": cur})  # 65 s and however long this test took since
    assert re.fullmatch(r"stage live  waiting for data 3/8 \(for 1m(0[5-9]|1[0-4])s\)", line), line

    write_status(tmp_path, "live", line="training on 9 samples", waiting=False, since=None)
    cur = _current(tmp_path, state)
    assert "waiting_s" not in cur["data"]
    assert _current_line({"current": cur}) == "stage live  training on 9 samples"
