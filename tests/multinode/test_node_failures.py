"""A run spanning two hosts fails on both, and leaves nothing running, when one node finds a
NaN or when one node's torchrun is killed; a layout that does not fit is refused first."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness.waits import wait_for
from tests.hosts.conftest import ENV
from tests.multinode.conftest import stages_of, state_of, wait_exited

torch = pytest.importorskip("torch")

NAN_ON_NODE_1 = """
[stages.span]
dataset = "data/train8.jsonl"
executor = "torchrun"
nnodes = 2
nproc_per_node = 1

[stages.span.train]
batch_size = 2          # a global batch of 4: 2 steps an epoch, checkpoint-2 before the NaN
grad_accum = 1
eval_holdout = 0.0
inject_fault = "nan@3:rank1"
"""


def test_a_nan_on_node_1_stops_both_nodes_before_the_step_with_every_weight_finite(
        cli, spanning_project, roots):
    from safetensors.torch import load_file

    spanning_project(["span", "collect"], NAN_ON_NODE_1)
    res = cli("remote-train", "--host", "@pair", "--yes", env=ENV, timeout=600)
    assert res.returncode == 1, res.stdout + res.stderr
    run_id = re.search(r"started (run_\w+) as node 0", res.stdout).group(1)
    assert "remote-train failed on 2 of 2 hosts: h1, h2" in res.stderr
    for rank, host in enumerate(("h1", "h2")):
        state = state_of(roots[host], run_id)
        stage = stages_of(state)["span"]
        assert (state["status"], stage["failure_class"]) == ("failed", "nan"), stage
        assert len(stage["attempts"]) == 1  # NaN is not retried
        run = roots[host] / "outputs" / "training_sync" / run_id
        failed = json.loads((run / "span.failed.json").read_text())
        assert failed["reason"] == "nan" and failed["step"] == 3 and failed["rank"] == rank
        # the NaN loss is rank 1's; after the all-reduce both ranks' gradients are NaN too
        assert re.search(r"found on ranks? (1|0, 1) of 2; every rank stopped before the "
                         r"optimizer step", failed["message"]), failed["message"]
        ckpts = run / "checkpoints" / "span"
        assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2"]  # nothing after
        files = list(ckpts.rglob("*.safetensors"))
        assert files and all(torch.isfinite(t).all() for f in files
                             for t in load_file(str(f)).values())
        assert not (roots[host] / "outputs" / "adapter" / "adapter_span").exists()
    assert _left_running(run_id, roots) == []


HANG_ON_NODE_1 = NAN_ON_NODE_1.replace('"nan@3:rank1"', '"hang@3:rank1"')


def _another_tests(pid: str, roots: dict[str, Path]) -> bool:
    """Is the process provably another test's? Run ids have a second's resolution, and the
    other test process (pytest-xdist) may start a run in the same second: its processes
    work in its own temp folder under pytest's, never under this test's."""
    mine = Path(os.path.commonpath([str(p) for p in roots.values()]))
    base = next((p for p in mine.parents if p.name.startswith("pytest-of-")), None)
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return base is not None and cwd.is_relative_to(base) and not cwd.is_relative_to(mine)


def _left_running(run_id: str, roots: dict[str, Path]) -> list[str]:
    """Processes on this machine (both "hosts" are on it) whose command line names the run."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if run_id in line and str(os.getpid()) not in line
            and "ps -eo" not in line and not _another_tests(line.split()[0], roots)]


def _hung_on_node_1(cli, spanning_project, roots) -> str:
    """A spanning run started detached whose node 1 hangs at step 3; its run id."""
    spanning_project(["span", "collect"], HANG_ON_NODE_1)
    res = cli("remote-train", "--host", "@pair", "--yes", "--detach", env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = re.search(r"started (run_\w+) as node 0", res.stdout).group(1)
    log2 = roots["h2"] / "outputs" / "training_sync" / run_id / "logs" / "span.log"
    wait_for(lambda: "hanging at step 3" in (log2.read_text() if log2.is_file() else ""), 240,
             "node 1 to reach step 3", every=0.3)
    return run_id


def test_killing_one_nodes_torchrun_fails_both_hosts_leaves_no_process_and_resumes(
        cli, spanning_project, roots):
    run_id = _hung_on_node_1(cli, spanning_project, roots)
    launcher = stages_of(state_of(roots["h2"], run_id))["span"]["process"]["pid"]
    killed = time.monotonic()
    os.kill(launcher, signal.SIGKILL)  # node 1's torchrun dies hard; the laptop is gone

    ended = {}
    for host in ("h1", "h2"):
        state, at = wait_exited(roots[host], run_id, timeout=120)
        stage = stages_of(state)["span"]
        assert (state["status"], stage["failure_class"]) == ("failed", "node_lost"), stage
        assert len(stage["attempts"]) == 1  # never retried alone
        assert "node" in stage["reason"] and "of 2" in stage["reason"]
        ended[host] = at - killed
    assert max(ended.values()) < 60, ended  # bounded: both hosts fail within a minute
    assert _left_running(run_id, roots) == []  # no runner, torchrun or trainer left on either host

    status = cli("status", "--host", "h1,h2", env=ENV)
    assert "node_lost" in status.stdout or status.stdout.count("failed") >= 2, status.stdout

    # every node kept its own checkpoint-2: the same run resumes on both and finishes
    res = cli("remote-train", "--host", "@pair", "--yes", "--resume", run_id, env=ENV,
              timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    for host in ("h1", "h2"):
        state = state_of(roots[host], run_id)
        stage = stages_of(state)["span"]
        assert (state["status"], stage["status"]) == ("done", "done"), (host, stage)
        assert stage["attempts"][-1]["resume"] is True
        run = roots[host] / "outputs" / "training_sync" / run_id
        log = (run / "logs" / "span.log").read_text()
        last_launch = log.split("-m torch.distributed.run ")[-1].splitlines()[0]
        assert "--resume latest" in last_launch, last_launch
    run = roots["h1"] / "outputs" / "training_sync" / run_id  # rank 0 speaks for the stage
    assert f"resuming stage 'span' from {run}/checkpoints/span/checkpoint-2 (step 2)" in (
        run / "logs" / "span.log").read_text()
    assert json.loads((run / "summary.json").read_text())["stages"]["span"]["final"]["step"] == 4
    assert (roots["h1"] / "outputs" / "adapter" / "adapter_span" / "adapter_model.safetensors"
            ).is_file()


def test_cancel_on_both_hosts_stops_every_node_of_the_run(cli, spanning_project, roots):
    run_id = _hung_on_node_1(cli, spanning_project, roots)
    res = cli("cancel", "--host", "@pair", "--json", env=ENV)
    assert res.returncode == 0, res.stderr
    assert {h: v["result"]["run_id"] for h, v in json.loads(res.stdout).items()} == {
        "h1": run_id, "h2": run_id}
    for host in ("h1", "h2"):
        state, _ = wait_exited(roots[host], run_id, timeout=60)
        assert state["status"] == "cancelled", (host, state["status"])
        assert stages_of(state)["span"]["status"] == "cancelled"
    assert _left_running(run_id, roots) == []


LAYOUTS = [
    (["h1"], "stage span spans nnodes = 2 machines but --host names 1 (h1); name 2 hosts "
             "(--host a,b or a [groups] of 2) or change nnodes; nothing was started."),
    (["h1", "h2", "h3"], "stage span spans nnodes = 2 machines but --host names 3 (h1, h2, "
                         "h3); name 2 hosts"),
]


@pytest.mark.parametrize("hosts,expected", LAYOUTS)
def test_a_host_count_that_does_not_match_nnodes_is_one_line_before_anything_starts(
        cli, spanning_project, roots, hosts, expected):
    project = spanning_project(["span", "collect"], NAN_ON_NODE_1)
    with open(project / "remoteops.toml", "a") as fh:
        fh.write('\n[hosts.h3]\nhost = "127.0.0.3"\nport = 1\n')
    res = cli("remote-train", "--host", ",".join(hosts), "--yes", env=ENV)
    assert res.returncode != 0
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not any(root.exists() for root in roots.values())  # nothing deployed or started
