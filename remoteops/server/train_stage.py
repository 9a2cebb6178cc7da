"""The built-in stages the runner runs itself: precheck, and the trainer's argv, verdict
and out-of-memory retry.

The OOM retry's smaller batch travels as data: a JSON file of typed train settings
(``--overrides``) that the trainer reads back, never as renamed environment variables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from remoteops.common.files import write_atomic_text
from remoteops.common.rundir import RunDir
from remoteops.server.pipeline import ChildResult
from remoteops.server.stage_process import last_error

_NOT_THE_TRAINERS = ("error", "interrupted", "process_died")


def agent_train_args(run_dir: Path, stage: dict, resume: bool, overrides: dict) -> list[str]:
    """``remoteops-agent train`` arguments for this attempt (writes its overrides file)."""
    args = ["train", "--stage", stage["name"], "--run-dir", str(run_dir)]
    if overrides:  # typed values, read back as JSON by the trainer: no env-var renaming
        path = run_dir / "overrides" / f"{stage['name']}.attempt{stage['attempt']}.json"
        write_atomic_text(path, json.dumps({"train": overrides}, indent=1) + "\n")
        args += ["--overrides", str(path)]
    if resume:
        args += ["--resume", "latest"]
    return args


def judge(run_dir: Path, stage: str, result: ChildResult, log_path: Path
          ) -> tuple[bool, str | None, str | None]:
    """``(ok, failure class, reason)`` of a finished trainer: exit 2 is a config or data
    error; the trainer's own classes and a health_rules plugin's reason come from its
    ``failed`` signal; an unclassified crash is a dead process (resume from the checkpoint)."""
    if result.killed_for:  # the executor ended it (a Slurm time limit, preemption, ...)
        return False, result.killed_for, result.message
    if result.code == 0:
        return True, None, None
    failed = RunDir(run_dir, stage).read_signal("failed")
    if result.code == 2:
        return False, (failed or {}).get("reason", "config"), last_error(log_path)
    if failed and failed.get("reason") and failed["reason"] not in _NOT_THE_TRAINERS:
        return False, failed["reason"], failed.get("message", "")
    return False, "process_died", f"the trainer exited with {result.code}"


def next_attempt(settings, stage: dict, klass: str | None, reason: str | None, resume: bool,
                 overrides: dict) -> tuple[bool, bool, dict, str | None]:
    """The failure policy (``common.runs.POLICY``) for a failed attempt of ``stage``:
    ``(retry, resume, overrides, reason)``; a retry is noted in the stage's warnings."""
    from remoteops.common.runs import POLICY

    action = POLICY.get(klass, "fail")
    retries = len(stage["attempts"]) - 1
    if action == "smaller_batch" and stage["kind"] != "train":
        # we cannot change a command's batch size: fail and say what to do
        return False, resume, overrides, (f"{reason} (out of memory: command stages are not "
                                          "retried; lower the batch size in the command)")
    if action == "smaller_batch" and sum(1 for a in stage["attempts"] if a.get(
            "failure_class") == "oom") <= int(settings["pipeline.oom_retries"]):
        overrides = smaller_batch(settings, stage["name"], overrides)
        stage["warnings"].append(f"attempt {stage['attempt']}: out of memory; retrying "
                                 f"with batch {overrides['batch_size']} and gradient "
                                 f"accumulation {overrides['grad_accum']}")
        return True, resume, overrides, reason
    if action == "resume" and retries < int(settings["pipeline.max_retries"]):
        resume = stage["kind"] == "train"
        stage["warnings"].append(f"attempt {stage['attempt']}: {klass} ({reason}); "
                                 f"retrying{' from the latest checkpoint' if resume else ''}")
        return True, resume, overrides, reason
    return False, resume, overrides, reason


def smaller_batch(settings, stage: str, overrides: dict) -> dict:
    """The next OOM attempt's overrides: half the per-device batch, twice the accumulation."""
    from remoteops.trainer.stageconf import resolve_stage

    cfg = resolve_stage(settings, stage, overrides=overrides or None)
    batch, accum = int(cfg.train["batch_size"]), int(cfg.train["grad_accum"])
    return {"batch_size": max(1, batch // 2), "grad_accum": accum * 2}


def precheck(settings, root: Path, run_dir: Path, stage: dict
             ) -> tuple[bool, str | None, str | None]:
    """The precheck stage: every registered check against this machine (``precheck.json``)."""
    from remoteops.common.target import LocalTarget
    from remoteops.precheck import run_precheck

    target = LocalTarget("server", str(root), sys.executable)
    rows = [r.to_dict() for r in run_precheck(settings, target)]  # gpu_gate flag included
    write_atomic_text(run_dir / "precheck.json", json.dumps(rows, indent=1) + "\n")
    stage["outputs"]["precheck"] = "precheck.json"
    stage["warnings"] += [f"{r['name']}: {r['value']}" for r in rows if r["status"] == "warn"]
    failed = [r for r in rows if r["status"] == "fail"]
    if failed:
        return False, "config", "; ".join(f"{r['name']}: {r['value']}" for r in failed[:3])
    return True, None, None
