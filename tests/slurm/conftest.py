"""A private Slurm cluster (``tests/harness/slurm.py``) for the session, and the demo
project and pipeline helpers of ``tests/executors``."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.executors.conftest import make_project, stages_of  # noqa: F401
from tests.harness.slurm import SlurmCluster, why_no_slurm


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node cluster on this machine; ``SLURM_CONF`` names it for every process the
    tests start (the agent, its runner, the jobs)."""
    reason = why_no_slurm()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm-cluster"), cpus=4).start()
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
        left = cluster.leftovers()
        assert not left, f"Slurm processes left running: {left}"


def wait_for(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout} s")


def latest_run(root):
    runs = sorted((root / "outputs" / "training_sync").glob("run_*"))
    return runs[-1] if runs else None


def job_of(root, stage: str):
    run = latest_run(root)
    if run is None or not (run / "state.json").is_file():
        return None
    state = json.loads((run / "state.json").read_text())
    return stages_of(state)[stage].get("executor", {}).get("job")


def run_pipeline_end(root, timeout: float = 180):
    run = latest_run(root)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads((run / "state.json").read_text())
        if state.get("runner", {}).get("exited"):
            return run, state
        time.sleep(0.5)
    raise AssertionError((run / "runner.log").read_text()[-2000:])
