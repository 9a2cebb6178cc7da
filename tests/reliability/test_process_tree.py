"""Stopping a stage stops its whole process tree, and what the tree writes afterwards is not
the stage's output.

The stage is a shell script that runs its "trainer" as a child through a pipe
(``python trainer.py | tee``); the trainer moves to its own session, ignores
SIGTERM (it answers it on stderr) and leaves a daemonised grandchild (double
fork + setsid) that ignores SIGTERM too. Every process of the tree carries a
marker in its environment, so /proc tells whether any of them survived.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from tests.test_pipeline import wait_for

TRAINER = r'''
import os, signal, sys, time
mode = sys.argv[1]
os.setsid()  # out of the stage's process group and session
signal.signal(signal.SIGTERM, lambda *a: print("AFTER-STOP: trainer got SIGTERM",
                                                file=sys.stderr, flush=True))
if os.fork() == 0:  # a daemon: double fork, own session, parent gone
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(0.1)
os.wait()
for i in range(1, 100000):
    if mode == "nan" and i == 4:
        print("step 4 loss: nan", flush=True)
    else:
        print(f"step {i} loss: {2.0 - i / 1000:.3f}", flush=True)
    time.sleep(0.1)
'''

TOML = """
[pipeline]
heartbeat_seconds = 0.5
poll_seconds = 0.3
stop_grace_seconds = 1.0
stages = ["mine"]

[stages.mine]
command = "bash train.sh {mode}"
"""


@pytest.fixture
def tree_project(project) -> Path:
    (project / "trainer.py").write_text(TRAINER)
    (project / "train.sh").write_text("python3 trainer.py \"$1\" | tee trainer.log\n")
    return project


def marked(mark: str) -> list[int]:
    """Live processes (zombies excluded) whose environment carries ``mark``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                if mark.encode() not in fh.read():
                    continue
            with open(f"/proc/{name}/stat") as fh:
                if fh.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
                    continue
        except OSError:
            continue
        found.append(int(name))
    return found


def _env(mark: str) -> dict:
    return {"TREE_MARK": mark, "TRAIN_SYNC_ASSUME_YES": "1", "REMOTEOPS_GPU_GATE": "warn"}


def _run(project: Path) -> tuple[dict, str]:
    run = next((project / "outputs" / "training_sync").glob("run_*"))
    return (json.loads((run / "state.json").read_text()),
            (run / "logs" / "mine.log").read_text())


def test_nan_line_stops_the_whole_tree_and_later_writes_are_not_output(cli, tree_project):
    (tree_project / "remoteops.toml").write_text(TOML.replace("{mode}", "nan"))
    mark = uuid.uuid4().hex
    res = cli("remote-train", "--host", "local", "--stages", "mine", env=_env(mark),
              timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert marked(mark) == []  # shell, tee, the setsid'd trainer and its daemon: all gone
    state, log = _run(tree_project)
    stage = state["stages"][0]
    assert (stage["status"], stage["failure_class"]) == ("failed", "nan")
    assert "step 4 loss: nan" in log
    assert "AFTER-STOP" not in log  # written after the stop: discarded
    assert "==> stopped (nan)" in log


def test_cancel_stops_the_whole_tree(cli, tree_project):
    (tree_project / "remoteops.toml").write_text(TOML.replace("{mode}", "run"))
    mark = uuid.uuid4().hex
    res = cli("remote-train", "--host", "local", "--stages", "mine", "--detach",
              env=_env(mark), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = res.stdout.split("started ")[1].split()[0]
    log_path = tree_project / "outputs" / "training_sync" / run_id / "logs" / "mine.log"
    wait_for(lambda: log_path.is_file() and "step 5 " in log_path.read_text(), timeout=60)
    assert len(marked(mark)) >= 4  # runner, bash, tee, trainer, daemon
    res = cli("cancel", "--host", "local", "--run", run_id, env=_env(mark), timeout=120)
    assert res.returncode == 0 and "cancelled" in res.stdout, res.stdout + res.stderr
    assert marked(mark) == []
    state, log = _run(tree_project)
    assert state["status"] == "cancelled" and state["stages"][0]["status"] == "cancelled"
    assert "AFTER-STOP" not in log
    size = log_path.stat().st_size
    time.sleep(0.5)
    assert log_path.stat().st_size == size  # nothing is left that writes to it
