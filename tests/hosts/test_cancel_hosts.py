"""cancel on two hosts whose runs are still running: both stop, nothing is left running."""

from __future__ import annotations

import os
import sys

from tests.harness.waits import wait_for
from tests.hosts.conftest import ENV, keyed, write_project

SLEEPER = """import os, pathlib, sys, time
pathlib.Path(sys.argv[1], "sleeper.pid").write_text(str(os.getpid()))
time.sleep(300)
"""

PIPELINE = f"""
[pipeline]
stages = ["slow"]
heartbeat_seconds = 0.5
poll_seconds = 0.3

[stages.slow]
command = "{sys.executable} sleeper.py {{run_dir}}"
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cancel_on_two_hosts_stops_both_running_runs_and_their_processes(
        cli, project, servers, roots):
    (project / "sleeper.py").write_text(SLEEPER)
    write_project(project, servers[:2], roots, PIPELINE)
    started = cli("remote-train", "--host", "h1,h2", "--yes", "--detach", env=ENV, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr

    def pid_files():
        return [p for h in ("h1", "h2")
                for p in (roots[h] / "outputs" / "training_sync").glob("run_*/sleeper.pid")]

    wait_for(lambda: len(pid_files()) == 2 and all(p.read_text() for p in pid_files()), 120,
             "both commands to start")
    pids = [int(p.read_text()) for p in pid_files()]
    assert all(_alive(pid) for pid in pids)

    res = cli("cancel", "--host", "h1,h2", "--json", env=ENV, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    cancelled = keyed(res.stdout)
    assert {h: v["result"]["status"] for h, v in cancelled.items()} == \
        {"h1": "cancelled", "h2": "cancelled"}
    wait_for(lambda: not any(_alive(pid) for pid in pids), 30, "the commands to end")
    status = keyed(cli("status", "--host", "h1,h2", "--json", env=ENV).stdout)
    assert {h: v["result"]["status"] for h, v in status.items()} == \
        {"h1": "cancelled", "h2": "cancelled"}
