"""remoteops.hooks.TrainingHooks: the built-in trainer's signals, metrics and health rules for
any training loop, without torch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from remoteops.hooks import TrainingHooks

RULE = '''
from remoteops import hookimpl


def _lr_cap(step, loss=None, grad_norm=None, lr=None):
    if lr is not None and lr > 0.5:
        return "lr_too_high", f"lr {lr} at step {step} is above the project's cap 0.5"


@hookimpl
def health_rules(register):
    register(_lr_cap)
'''


def _signal(run: Path, name: str) -> dict:
    return json.loads((run / f"{name}.json").read_text())


def test_importing_the_hooks_imports_no_torch_transformers_or_lightning():
    code = ("import sys, remoteops.hooks; h = remoteops.hooks.TrainingHooks(); "
            "h.check(1, loss=1.0); "
            "print(sorted(m for m in ('torch', 'transformers', 'pytorch_lightning', 'lightning') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_signals_and_metrics_are_the_built_in_trainers_files(tmp_path):
    run = tmp_path / "run_x"
    hooks = TrainingHooks(run, "style")
    for step, loss in enumerate([2.0, 1.8, 1.7], 1):
        assert hooks.check(step, loss=loss, grad_norm=0.5, lr=1e-3) is None
        hooks.log_metrics(step, loss=loss, lr=1e-3, grad_norm=0.5, tokens=99)
    healthy = _signal(run, "style.healthy")  # after health.warmup_check_steps (3) clean steps
    assert (healthy["stage"], healthy["signal"], healthy["step"]) == ("style", "healthy", 3)
    assert (run / "style.healthy").read_text() == "warmup check passed\n"
    problem = hooks.check(4, loss="nan")  # text, as a log would give it
    assert problem == ("nan", "loss is nan at step 4", 4)
    failed = _signal(run, "style.failed")
    assert (failed["reason"], failed["message"], failed["step"]) == ("nan", problem.message, 4)
    assert hooks.check(5, loss=1.0) == problem  # stays failed: later steps are dropped too
    assert hooks.mark_done({"loss": 1.7}) is False and not (run / "style.done").exists()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [(r["stage"], r["step"], r["loss"]) for r in rows] == [
        ("style", "1", "2.0"), ("style", "2", "1.8"), ("style", "3", "1.7")]
    done = TrainingHooks(run, "writing")
    done.mark_healthy(10, 0.9)
    assert done.mark_done({"loss": 0.9, "note": "ok"}) is True
    assert _signal(run, "writing.done")["final"] == {"loss": 0.9, "note": "ok"}
    assert _signal(run, "writing.healthy")["loss"] == 0.9


def test_the_same_rules_as_the_built_in_trainer(tmp_path):
    hooks = TrainingHooks(tmp_path / "r", "s", warmup_steps=2)
    assert hooks.check(1, loss=2.0, lr=0.0) is None  # warmup from 0 is fine
    assert hooks.check(2, loss=1.0, grad_norm=float("inf"))[1] == "gradient norm is inf at step 2"
    assert TrainingHooks(tmp_path / "r", "t").check(1, loss=2e4).reason == "divergence"
    spike = TrainingHooks(tmp_path / "r", "u")
    assert spike.check(1, loss=1.5) is None and spike.check(2, loss=40.0).reason == "divergence"
    lr = TrainingHooks(tmp_path / "r", "v", warmup_steps=2)
    assert [lr.check(s, loss=1.0, lr=0.0) for s in (1, 2)] == [None, None]
    assert lr.check(3, loss=1.0, lr=0.0).reason == "lr_zero"


class _Tensor:
    """Anything with .item(), as a 0-d torch tensor or numpy scalar is."""

    def __init__(self, value: float):
        self.value = value

    def item(self) -> float:
        return self.value


def test_the_stage_environment_settings_and_plugin_rules_are_found(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    (root / "plugins").mkdir(parents=True)
    (root / "plugins" / "lr_cap.py").write_text(RULE)
    (root / "remoteops.toml").write_text("[health]\nloss_max = 50.0\nwarmup_check_steps = 1\n"
                                         "[stages.writing.health]\nloss_max = 5.0\n")
    run = root / "outputs" / "training_sync" / "run_1"
    monkeypatch.setenv("REMOTEOPS_RUN_DIR", str(run))
    monkeypatch.setenv("REMOTEOPS_STAGE", "writing")
    monkeypatch.delenv("REMOTEOPS_PROJECT_ROOT", raising=False)  # found from the run dir
    hooks = TrainingHooks()
    assert (hooks.active, hooks.stage, hooks.health["loss_max"]) == (True, "writing", 5.0)
    assert hooks.check(1, loss=_Tensor(4.0)) is None
    assert (run / "writing.healthy").is_file()  # warmup_check_steps = 1
    assert hooks.check(2, loss=6.0).reason == "divergence"  # the stage's own loss_max
    monkeypatch.setenv("REMOTEOPS_STAGE", "style")
    monkeypatch.setenv("REMOTEOPS_PROJECT_ROOT", str(root))
    style = TrainingHooks()
    assert style.check(1, loss=6.0) is None  # [health] loss_max = 50 for other stages
    found = style.check(2, loss=5.0, lr=0.9)
    assert found == ("lr_too_high", "lr 0.9 at step 2 is above the project's cap 0.5", 2)
    assert _signal(run, "style.failed")["reason"] == "lr_too_high"


def test_outside_a_stage_nothing_is_written_and_checks_still_judge(tmp_path, monkeypatch):
    for name in ("REMOTEOPS_RUN_DIR", "REMOTEOPS_STAGE", "REMOTEOPS_PROJECT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    hooks = TrainingHooks()
    assert not hooks.active
    hooks.log_metrics(1, loss=1.0)
    hooks.mark_healthy(1)
    assert hooks.check(2, loss=float("nan")).reason == "nan"
    assert list(tmp_path.iterdir()) == []


def test_in_a_multi_process_run_only_rank_0_writes_metrics_but_any_rank_may_fail(tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("RANK", "1")
    other = TrainingHooks(tmp_path / "run", "all")
    for step in (1, 2, 3):
        other.check(step, loss=1.0)
        other.log_metrics(step, loss=1.0)
    assert other.healthy and not (tmp_path / "run" / "metrics.csv").exists()
    assert not (tmp_path / "run" / "all.healthy").exists()
    other.check(4, loss=float("inf"))
    assert _signal(tmp_path / "run", "all.failed")["message"] == "loss is inf at step 4"
