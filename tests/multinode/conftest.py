"""Two real sshd on 127.0.0.1 and 127.0.0.2 (the "machines" h1 and h2 of the session's
``servers``, each with its own project root), and a project naming them as [groups.pair]."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.hosts.conftest import write_project
from tests.harness.demo import DEMO, head_lines


# 8 samples; a global batch of 8 is one optimizer step an epoch, the same samples whether
# one process takes 4 + 4 (grad accum 2) or the two nodes take 4 each.
TRAIN = """
[train]
base_model = "{model}"
lr = 2e-3
epochs = 2
max_seq_len = 96
lora_r = 8
lora_alpha = 16
lora_dropout = 0.0
lora_targets = ["q_proj", "v_proj"]

[health]
heartbeat_seconds = 1.0

[eval]
max_new_tokens = 2

[pipeline]
stages = {stages}
heartbeat_seconds = 0.5
poll_seconds = 0.3
stop_grace_seconds = 2.0

[groups.pair]
hosts = ["h1", "h2"]
"""


@pytest.fixture
def pair(servers):
    """h1 and h2: the first two of the session's sshd (tests/conftest.py)."""
    return servers[:2]


@pytest.fixture
def roots(tmp_path) -> dict[str, Path]:
    return {f"h{i}": tmp_path / f"server-h{i}" / "proj" for i in (1, 2)}




@pytest.fixture
def spanning_project(project, pair, roots, tiny_model):
    """``make(stages, tail)``: the project (``stages`` its pipeline, ``tail`` its [stages]
    tables), its 8 training and 2 eval samples, h1 and h2."""

    def make(stages: list[str], tail: str) -> Path:
        head_lines(DEMO / "data" / "style.jsonl", project / "data" / "train8.jsonl", 8)
        head_lines(DEMO / "data" / "eval" / "style.jsonl", project / "data" / "eval2.jsonl", 2)
        write_project(project, pair, roots, TRAIN.format(model=tiny_model, stages=json.dumps(stages))
                      + tail)
        return project

    return make


def state_of(root: Path, run_id: str) -> dict:
    return json.loads((root / "outputs" / "training_sync" / run_id / "state.json").read_text())


def stages_of(state: dict) -> dict[str, dict]:
    return {s["name"]: s for s in state["stages"]}


def wait_exited(root: Path, run_id: str, timeout: float) -> tuple[dict, float]:
    """The run's state once its runner has exited, and when (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = state_of(root, run_id)
        except (OSError, ValueError):
            state = {}
        if state.get("runner", {}).get("exited"):
            return state, time.monotonic()
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} under {root} did not end in {timeout} s")
