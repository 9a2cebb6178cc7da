"""A live stage's settings: accepted by the schema, the stage planner and the trainer's
stage config; bad combinations get one line that says what to do; a command stage finds the
same live set in its environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from remoteops.common.config import load_settings
from remoteops.common.errors import ConfigError
from remoteops.common.live_set import from_env
from remoteops.common.runs import plan_stages
from remoteops.server import command_stage
from remoteops.trainer.stageconf import resolve_stage


def _settings(root: Path, toml: str):
    root.mkdir(parents=True, exist_ok=True)
    (root / "remoteops.toml").write_text(toml)
    return load_settings(root, env={"REMOTEOPS_USER_CONFIG": str(root / "none.toml")})


def test_a_live_stage_plans_and_resolves(tmp_path):
    settings = _settings(tmp_path, '[pipeline]\nstages = ["live"]\n[stages.live]\n'
                         'dataset_live = "data/live"\nmin_samples = 50\npoll_seconds = 60\n'
                         'grow_every_steps = 10\nmax_steps = 500\n')
    assert [s["name"] for s in plan_stages(settings, None, False)] == ["live"]
    cfg = resolve_stage(settings, "live")
    assert cfg.dataset is None
    assert cfg.live == {"dest": tmp_path / "data/live", "min_samples": 50, "poll_seconds": 60.0,
                        "grow_every_steps": 10, "max_steps": 500}


@pytest.mark.parametrize("table, says", [
    ('dataset = "data/a.jsonl"\ndataset_live = "data/live"',
     "names both dataset and dataset_live; keep one"),
    ('dataset = "data/a.jsonl"\nmin_samples = 5',
     "'stages.live.min_samples' applies to a live dataset only; add dataset_live"),
    ('dataset_live = "data/live"\nmin_samples = 0', "'stages.live.min_samples' is 0"),
    ('dataset_live = "../elsewhere"', "'stages.live.dataset_live' is '../elsewhere'"),
    ('dataset_live = "data/live"\ngrow_every_steps = -1', "'stages.live.grow_every_steps' is -1"),
])
def test_bad_combinations_are_one_line(tmp_path, table, says):
    with pytest.raises(ConfigError) as err:
        _settings(tmp_path, f"[stages.live]\n{table}\n")
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_cli_says_it_in_one_line_without_a_traceback(tmp_path):
    (tmp_path / "remoteops.toml").write_text('[stages.live]\ndataset = "d.jsonl"\n'
                                             'dataset_live = "data/live"\n')
    res = subprocess.run([sys.executable, "-m", "remoteops", "config"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60,
                         env={"REMOTEOPS_USER_CONFIG": str(tmp_path / "none.toml"),
                              "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert res.returncode != 0
    assert "remoteops.toml:3: stage 'live' names both dataset and dataset_live" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_a_command_stage_reads_the_same_manifest(tmp_path):
    settings = _settings(tmp_path, '[stages.mine]\ncommand = "python train.py"\n'
                         'dataset_live = "data/live"\nmin_samples = 7\n')
    _, env, _ = command_stage.prepare(settings, settings["stages"]["mine"], "mine",
                                      tmp_path / "run", tmp_path)
    assert env["REMOTEOPS_LIVE_DATA"] == str(tmp_path / "data/live")
    live = from_env(env)
    assert live.dest == tmp_path / "data/live" and live.min_samples == 7
