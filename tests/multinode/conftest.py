"""Two real sshd on 127.0.0.1 and 127.0.0.2 (the "machines" h1 and h2, each with its own
project root), a project naming them as [groups.pair], and the tiny demo model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import sshd_folder
from tests.harness.sshd import keygen, start_sshd
from tests.hosts.conftest import ENV, write_project  # noqa: F401 - ENV is used by the tests

DEMO = Path(__file__).resolve().parents[2] / "remoteops" / "demo"

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


@pytest.fixture(scope="session")
def pair():
    """Two sshd sharing one client key."""
    folder = sshd_folder()
    key = folder / "client_key"
    keygen(key)
    started = []
    try:
        for i, address in enumerate(("127.0.0.1", "127.0.0.2")):
            started.append(start_sshd(folder / f"h{i + 1}", host=address, client_key=key))
        yield started
    finally:
        for server in started:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def roots(tmp_path) -> dict[str, Path]:
    return {f"h{i}": tmp_path / f"server-h{i}" / "proj" for i in (1, 2)}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from remoteops.trainer.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("multinode-model") / "demo-model", seed=0)


def _head(src: Path, dest: Path, n: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(src.read_text(encoding="utf-8").splitlines(True)[:n]),
                    encoding="utf-8")


@pytest.fixture
def spanning_project(project, pair, roots, tiny_model):
    """``make(stages, tail)``: the project (``stages`` its pipeline, ``tail`` its [stages]
    tables), its 8 training and 2 eval samples, h1 and h2."""

    def make(stages: list[str], tail: str) -> Path:
        _head(DEMO / "data" / "style.jsonl", project / "data" / "train8.jsonl", 8)
        _head(DEMO / "data" / "eval" / "style.jsonl", project / "data" / "eval2.jsonl", 2)
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
