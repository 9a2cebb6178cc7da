"""A private Slurm cluster (``tests/harness/slurm.py``) for the session, and the demo
project and pipeline helpers of ``tests/executors``."""

from __future__ import annotations

import os

import pytest

from tests.executors.conftest import make_project, tiny_model  # noqa: F401 (fixtures)
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
