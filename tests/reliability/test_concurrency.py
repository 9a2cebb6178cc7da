"""Concurrency on one project root: a live run against deploys and rollbacks, a pending
apply journal at pipeline start, a lock raced by many processes, and pid reuse.

Real processes throughout: the local target (its own agent process), real locks raced by
real processes, real ``sleep`` processes standing in for a pid that was reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_deploy import expected_tree, make_project, tree
from tests.reliability.test_pipeline_faults import BASE, YES
from tests.test_pipeline import wait_for

SLOW = BASE + """stages = ["slow"]

[stages.slow]
command = "echo begin; sleep 60; echo end"

[stages.hashes]
command = "sha256sum code/train.py code/util.py > {run_dir}/seen.txt"
"""


@pytest.fixture
def server_root(tmp_path) -> Path:
    return tmp_path / "server" / "proj"


@pytest.fixture
def local(cli, project, server_root):
    """Run a task against the local target with the project deployed to ``server_root``."""
    make_project(project)
    (project / "remoteops.toml").write_text(SLOW)

    def run(task, *args, env=None, expect=0, timeout=120):
        res = cli(task, "--host", "local", "--project-root", str(server_root), *args,
                  env={**YES, **(env or {})}, timeout=timeout)
        if expect is not None:
            assert res.returncode == expect, res.stdout + res.stderr
        return res

    return run


def code(root: Path) -> dict[str, str]:
    """The deployed files (the run's own outputs change while it runs)."""
    return {p: h for p, h in tree(root).items() if not p.startswith("outputs/")}


def _ledger(root: Path) -> str:
    path = root / ".remoteops" / "ledger.jsonl"
    return path.read_text() if path.is_file() else ""


def test_deploy_rollback_and_a_second_remote_train_refuse_while_a_run_is_live(
        local, project, server_root):
    res = local("remote-train", "--stages", "slow", "--detach")
    run_id = res.stdout.split("started ")[1].split()[0]
    assert "deployed v1" in res.stdout
    backup = json.loads(local("backups", "--json").stdout)[0]["name"]
    (project / "code" / "train.py").write_text("print('v2')\n")
    before, ledger = code(server_root), _ledger(server_root)

    # the server refuses (deploy-apply, fast path or not), before anything changes
    res = local("deploy-bundle", expect=2)
    assert f"pipeline run {run_id} is live" in res.stderr
    assert f"invoke cancel --run {run_id}" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = local("rollback", backup, expect=2)
    assert f"pipeline run {run_id} is live" in res.stderr
    # the laptop refuses before deploying
    res = local("remote-train", "--stages", "slow", expect=2)
    assert f"pipeline run {run_id} is live" in res.stderr and "nothing was deployed" in res.stderr
    assert code(server_root) == before and _ledger(server_root) == ledger

    local("cancel", "--run", run_id)
    local("deploy-bundle")  # the run is over: deploys go through again
    assert code(server_root) == expected_tree(project)


def test_pipeline_start_undoes_a_deploy_killed_half_way(local, project, server_root):
    local("deploy-bundle")
    v1 = {p: hashlib.sha256((server_root / p).read_bytes()).hexdigest()
          for p in ("code/train.py", "code/util.py")}
    (project / "code" / "train.py").write_text("print('v2')\n")
    (project / "code" / "util.py").write_text("X = 2\n")
    local("deploy-bundle", env={"REMOTEOPS_TEST_KILL_AFTER_FILES": "1"}, expect=2)
    assert (server_root / ".remoteops" / "journal.json").is_file()  # half applied
    res = local("remote-train", "--stages", "hashes", "--no-deploy")
    state = json.loads(next((server_root / "outputs" / "training_sync").glob(
        "run_*/state.json")).read_text())
    assert state["status"] == "done", res.stdout + res.stderr
    assert any("undid an interrupted apply" in n for n in state.get("notes", []))
    seen = (Path(state["run_dir"]) / "seen.txt").read_text().split()
    assert dict(zip(seen[1::2], seen[0::2])) == v1  # the stage saw all of v1, nothing of v2
    assert not (server_root / ".remoteops" / "journal.json").exists()


RACER = r"""
import os, sys, time
from pathlib import Path
from remoteops.common.locks import FileLock, LockedError
path, go, done = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
while time.time() < go:
    time.sleep(0.001)
lock = FileLock(path, "racer")
try:
    lock.acquire()
except LockedError:
    print("lost")
    (done / str(os.getpid())).touch()
    sys.exit(0)
print("won", lock.broken and lock.broken["holder"])
sys.stdout.flush()
(done / str(os.getpid())).touch()
deadline = time.time() + 60
while len(list(done.iterdir())) < 8 and time.time() < deadline:
    time.sleep(0.01)  # hold it until every other racer has tried
lock.release()
"""


@pytest.mark.parametrize("left", ["legacy", "flock"])
def test_eight_processes_racing_for_a_dead_holders_lock_exactly_one_wins(tmp_path, left):
    path = tmp_path / "root" / ".remoteops" / "lock"
    path.parent.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    held = {"holder": "deploy v7 (killed)", "host": socket.gethostname(), "pid": dead.pid,
            "time": "2026-11-24T01:00:00Z"}
    if left == "flock":
        held["flock"] = True
    path.write_text(json.dumps(held))
    go = time.time() + 1.5
    done = tmp_path / "done"
    done.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(path), str(go), str(done)],
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["lost"] * 7 + ["won"], outs
    assert [o for o in outs if o.startswith("won")] == ["won deploy v7 (killed)"]
    assert not path.exists()  # released: removed


def test_a_live_holder_keeps_the_lock_and_its_death_frees_it(tmp_path):
    path = tmp_path / "lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom remoteops.common.locks import FileLock\n"
        f"FileLock({str(path)!r}, 'deploy v9').acquire()\nprint('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from remoteops.common.locks import FileLock, LockedError

        with pytest.raises(LockedError, match=f"locked by deploy v9 \\(pid {holder.pid} "):
            FileLock(path, "me").acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = FileLock(path, "me")
    lock.acquire()  # kill -9 left the file; the kernel freed the lock
    assert lock.broken["holder"] == "deploy v9"
    lock.release()


def _start_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[-1].split()[19])


def test_a_reused_runner_pid_is_dead_to_status_and_cancel_does_not_kill_it(cli, project):
    (project / "remoteops.toml").write_text(SLOW)
    run = project / "outputs" / "training_sync" / "run_20261126T000000Z"
    (run / "logs").mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ident = {"host": socket.gethostname(), "pid": sleeper.pid,
                 "start": _start_ticks(sleeper.pid) + 1,  # the runner was another process
                 "boot": Path("/proc/sys/kernel/random/boot_id").read_text().strip()}
        state = {"run_id": run.name, "run_dir": str(run), "project_root": str(project),
                 "created": "2026-11-26T00:00:00Z", "status": "running", "host": "local",
                 "options": {"heartbeat_seconds": 0.5, "gpu_gate": "warn"},
                 "runner": {"pid": sleeper.pid, "host": socket.gethostname(),
                            "started": "2026-11-26T00:00:00Z", "identity": ident},
                 "stages": [{"name": "slow", "kind": "command", "status": "running",
                             "attempt": 1, "attempts": [], "started": None, "ended": None,
                             "duration_s": None, "failure_class": None, "reason": None,
                             "outputs": {}, "warnings": []}]}
        (run / "state.json").write_text(json.dumps(state))
        (run / "runner.heartbeat").write_text(json.dumps({"time": time.time(),
                                                          "pid": sleeper.pid}))
        res = cli("status", "--host", "local", "--json", env=YES)
        assert json.loads(res.stdout)["status"] == "dead", res.stdout + res.stderr
        res = cli("cancel", "--host", "local", "--run", run.name, env=YES)
        assert res.returncode == 0, res.stderr
        time.sleep(0.3)
        assert sleeper.poll() is None  # the unrelated process lives on
        assert json.loads((run / "state.json").read_text())["status"] == "cancelled"
    finally:
        sleeper.kill()
        sleeper.wait()
