"""A small demo project and the agent's pipeline, run for real on this machine (no laptop)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.harness.demo import DEMO, head_lines

REPO = Path(__file__).resolve().parents[2]

# 8 samples: a global batch of 8 is one optimizer step per epoch, the same samples whether
# one process takes 4 + 4 (grad accum 2) or two ranks take 2 + 2 each.
BASE = """
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
max_new_tokens = 4

[pipeline]
heartbeat_seconds = 0.5
poll_seconds = 0.3
stop_grace_seconds = 2.0
"""




@pytest.fixture
def make_project(tmp_path, tiny_model):
    """``make_project(toml_tail)``: a project with 8 training and 2 eval samples."""

    def make(tail: str) -> Path:
        root = tmp_path / "proj"
        head_lines(DEMO / "data" / "style.jsonl", root / "data" / "train8.jsonl", 8)
        head_lines(DEMO / "data" / "eval" / "style.jsonl", root / "data" / "eval2.jsonl", 2)
        (root / "remoteops.toml").write_text(BASE.format(model=tiny_model) + tail)
        return root

    return make


def agent(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "REMOTEOPS_USER_CONFIG": str(root / "no-user-config.toml")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, "-m", "remoteops.agent", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_pipeline(root: Path, stages: str, timeout: float = 240) -> tuple[Path, dict]:
    """Start the pipeline detached, wait for its runner to exit; ``(run dir, state)``."""
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", stages, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    run = sorted((root / "outputs" / "training_sync").glob("run_*"))[-1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads((run / "state.json").read_text())
        if state.get("runner", {}).get("exited"):
            return run, state
        time.sleep(0.5)
    raise AssertionError(f"the run did not end in {timeout} s: "
                         + (run / "runner.log").read_text(errors="replace")[-2000:])


def stages_of(state: dict) -> dict[str, dict]:
    return {s["name"]: s for s in state["stages"]}
