"""The seed's own shape end to end: every stage is the command
``bash code/ai_service/training/run_train.sh {stage}``, whose Python loop reports through
``remoteops.hooks``. A NaN in ``writing`` (a corrupted label in its data) stops that stage
with the hooks' reason; ``all`` is skipped; the summary says why; ``status`` shows ``style``
healthy and done. A real detached run on the local target, and over a real sshd (deploy,
run, collect)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import ssh_alias, trust

SEED = Path(__file__).resolve().parent / "seed_project"
COMMAND = "bash code/ai_service/training/run_train.sh {stage}"
TOML = f"""
[pipeline]
stages = ["style", "writing", "all", "collect"]
heartbeat_seconds = 0.5
poll_seconds = 0.3
stop_grace_seconds = 1.0

[stages.style]
command = "{COMMAND}"
outputs = ["outputs/adapter/adapter_style"]

[stages.writing]
command = "{COMMAND}"
outputs = ["outputs/adapter/adapter_writing"]

[stages.all]
command = "{COMMAND}"
outputs = ["outputs/adapter/adapter_all"]
"""


def make_seed_project(root: Path) -> Path:
    shutil.copytree(SEED, root, dirs_exist_ok=True)
    script = root / "code" / "ai_service" / "training" / "run_train.sh"
    # the seed's script names its own environment's python; here, the one running the tests
    script.write_text(script.read_text().replace("@PYTHON@", sys.executable))
    (root / "remoteops.toml").write_text(TOML)
    return root


def _state(server_root: Path) -> dict:
    run = sorted((server_root / "outputs" / "training_sync").glob("run_*"))[-1]
    return json.loads((run / "state.json").read_text())


@pytest.mark.parametrize("host", ["local", "box"])
def test_a_nan_in_writing_stops_the_seeds_pipeline_through_the_hooks(cli, project, home,
                                                                      sshd_server, tmp_path,
                                                                      host):
    make_seed_project(project)
    env = {"TRAIN_SYNC_ASSUME_YES": "1", "REMOTEOPS_GPU_GATE": "warn"}
    server_root = project
    if host == "box":
        server_root = tmp_path / "server" / "proj"
        ssh_alias(home, "box", sshd_server)
        trust(project, sshd_server)
        env.update(REMOTEOPS_REMOTE_PYTHON=sys.executable,
                   TRAIN_SYNC_PROJECT_ROOT=str(server_root))
    res = cli("remote-train", "--host", host, env=env, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "stage writing failed (nan): loss is nan at step 3" in res.stderr
    assert "style: healthy (warmup check passed (step 3))" in res.stdout  # the follow view
    state = _state(server_root)
    stages = {s["name"]: s for s in state["stages"]}
    assert [(s["name"], s["status"]) for s in state["stages"]] == [
        ("style", "done"), ("writing", "failed"), ("all", "skipped"), ("collect", "skipped")]
    writing = stages["writing"]
    assert writing["failure_class"] == "nan" and writing["attempt"] == 1  # NaN: no retry
    assert writing["reason"] == "loss is nan at step 3 (writing.failed)"  # the hooks' signal
    assert stages["style"]["health"]["status"] == "healthy"
    run = project / "outputs" / "training_sync" / state["run_id"]  # collected when remote
    summary = (run / "TRAINING_SUMMARY.md").read_text()
    stopped = [line for line in summary.splitlines() if line.startswith("**Stopped:**")]
    assert stopped == [f"**Stopped:** stage `writing` failed (nan): {writing['reason']}"]
    assert "| all | skipped" in summary
    failed = json.loads((run / "writing.failed.json").read_text())
    assert (failed["reason"], failed["step"]) == ("nan", 3)
    assert json.loads((run / "style.done.json").read_text())["final"]["loss"] < 0.5
    assert (project / "outputs" / "adapter" / "adapter_style" / "weights.json").is_file()
    assert not (server_root / "outputs" / "adapter" / "adapter_writing").exists()
    res = cli("status", "--host", host, "--json", env=env)
    assert res.returncode == 1, res.stderr  # the run failed
    shown = {s["name"]: s for s in json.loads(res.stdout)["stages"]}
    assert shown["style"]["health"]["how"] == "warmup check passed (step 3)"
    res = cli("status", "--host", host, env=env)
    assert "done (healthy)" in res.stdout and "nan: loss is nan at step 3" in res.stdout
