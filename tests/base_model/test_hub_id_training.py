"""A Hugging Face id as train.base_model: the trainer reads the snapshot in the server's cache
(offline, nothing downloaded); one that is not cached is fetched first, and when that cannot
be done the stage ends with one line saying what to do. (The full pipeline trains from an
uploaded folder in test_demo_on_a_server.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from remoteops.trainer.demo_model import copy_demo_project  # noqa: E402
from tests.base_model import fakes  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STAGE = """
[stages.drill]
dataset = "data/sample.jsonl"
eval_set = "data/eval/style.jsonl"

[stages.drill.train]
epochs = 1
"""


def _agent(project: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "REMOTEOPS_"))}
    full.update(PYTHONPATH=str(REPO), REMOTEOPS_USER_CONFIG=str(project / "none.toml"), **env)
    return subprocess.run([sys.executable, "-m", "remoteops.agent", *args], cwd=project,
                          env=full, capture_output=True, text=True, timeout=600)


def test_a_cached_hub_id_loads_offline_and_an_uncached_one_says_what_to_do(tmp_path,
                                                                           tiny_model):
    files = {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()}
    snap = fakes.write_hf_cache(tmp_path / "hf" / "hub", "org/demo", files)
    project = copy_demo_project(tmp_path / "proj")
    text = (project / "remoteops.toml").read_text().replace(
        'base_model = "outputs/demo-model"', 'base_model = "org/demo"')
    (project / "remoteops.toml").write_text(text + STAGE)

    # the tokenizer, the data and the model's config come from the cache's snapshot
    res = _agent(project, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
                 "train", "--stage", "drill", "--dry-run", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert json.loads(res.stdout.splitlines()[-1])["params"] == 1705472
    assert snap.is_dir()

    res = _agent(project, {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"},
                 "train", "--stage", "drill", "--preset", "quick")
    assert res.returncode == 2
    assert "base model org/demo is not in this server's cache: downloading it now" in res.stdout
    assert res.stderr.strip().splitlines() == [
        "error: cannot download org/demo from https://huggingface.co (HF_HUB_OFFLINE is set); "
        "set HF_ENDPOINT on the server to a mirror it reaches (e.g. https://hf-mirror.com), or "
        "upload the laptop's copy instead: invoke fetch-model --host <this server> "
        "--from-laptop."]
