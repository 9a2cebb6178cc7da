"""The README's own path: the demo project, whose tiny model lives only in the laptop's
``outputs/`` (never shipped by a deploy), trains on a server with ``remote-train --host H``
and no extra step; precheck, before that, names the missing model and the fix."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import ssh_alias, trust
from tests.harness.demo import DEMO, head_lines
from tests.test_pipeline import TOML, state_of

pytest.importorskip("transformers")


@pytest.fixture
def demo(project, home, sshd_server, tiny_model) -> Path:
    """A small copy of the demo project with its model in outputs/demo-model, as init --demo
    leaves it (a short style stage: the point is where the model comes from)."""
    for name, n in (("sample", 2), ("style", 3)):
        head_lines(DEMO / "data" / f"{name}.jsonl", project / "data" / f"{name}.jsonl", n)
    head_lines(DEMO / "data" / "eval" / "style.jsonl", project / "data" / "eval" / "style.jsonl", 1)
    toml = TOML.format(model="outputs/demo-model")
    toml = toml[:toml.index("[stages.writing]")].replace(  # sample and style only
        "[pipeline]\n", '[pipeline]\nstages = ["precheck", "sample", "style", "collect"]\n')
    (project / "remoteops.toml").write_text(toml.replace("epochs = 2", "epochs = 1"))
    shutil.copytree(tiny_model, project / "outputs" / "demo-model")
    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)
    return project


def test_the_demo_trains_on_a_server_with_no_extra_step(cli, demo, tmp_path):
    root = tmp_path / "server" / "proj"
    env = {"REMOTEOPS_REMOTE_PYTHON": sys.executable, "TRAIN_SYNC_PROJECT_ROOT": str(root),
           "REMOTEOPS_GPU_GATE": "warn"}
    res = cli("deploy-bundle", "--host", "box", "--yes", env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not (root / "outputs" / "demo-model").exists()  # outputs/ is never shipped

    res = cli("precheck", "--host", "box", "--json", env=env, timeout=300)
    assert res.returncode == 1
    row = next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "base model")
    assert row["value"] == (f"outputs/demo-model is not on the server (no folder "
                            f"{root}/outputs/demo-model)")
    assert row["hint"].startswith("run `invoke fetch-model --host box --from-laptop`")

    res = cli("remote-train", "--host", "box", "--yes", "--skip-sample", env=env, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "model: outputs/demo-model (on this laptop: uploaded if the server lacks it)" in \
        res.stdout
    n = len(list((demo / "outputs" / "demo-model").iterdir()))
    assert f"base model outputs/demo-model: sent {n} of {n} files" in res.stdout, res.stdout
    state = state_of(root)
    assert [(s["name"], s["status"]) for s in state["stages"]] == [
        ("precheck", "done"), ("sample", "skipped"), ("style", "done"), ("collect", "done")]
    model = demo / "outputs" / "demo-model"
    for path in model.iterdir():
        assert (root / "outputs" / "demo-model" / path.name).read_bytes() == path.read_bytes()

