"""One stage run inside its own Slurm job, judged there: what a job of an up-front chain runs
(``remoteops-agent stage-job``, written into the job script by ``server/slurm_chain``).

The jobs of a chain are submitted at once, so nothing can run on the login node between
two of them. What the runner would do around a stage therefore happens here, on the job's
node, in this order: the ``before_stage`` hooks; the stage's process through
``server/stage_process`` with the runner's own watch (``server/stagewatch``: a command's
log read by the health rules, its ``failed`` signal, the health window); the runner's
verdict (``command_stage.judge``, ``train_stage.judge``); for a training stage that
succeeded, its evaluation and after-stage plugins; then the ``after_stage`` hooks of a stage
that is done. The verdict goes to a JSON file the runner reads when the job ends, and the
job exits non-zero unless the stage is done, so Slurm itself cancels the jobs after it
(``afterok``, ``--kill-on-invalid-dep=yes``). A job the cluster requeues runs this again: a
training stage then resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from remoteops.common.files import write_atomic_text
from remoteops.common.runs import run_settings, stop_grace
from remoteops.server import command_stage, train_stage
from remoteops.server.pipeline import agent_args
from remoteops.server.stage_process import StageProcess
from remoteops.server.stagewatch import StageWatch


def _say(output: Path, line: str) -> None:
    with open(output, "ab") as fh:
        fh.write(f"==> {line}\n".encode())


def _hook(pm, name: str, stage: dict, run_dir: Path, settings, **extra) -> None:
    try:
        getattr(pm.hook, name)(stage=stage["name"], run_dir=str(run_dir), settings=settings,
                               **extra)
    except Exception as exc:  # a plugin's bug is recorded, not fatal (as in the runner)
        stage["warnings"].append(f"{name} hook raised {type(exc).__name__}: {exc}")


def run_stage_job(root: Path, run_dir: Path, name: str, kind: str, argv: list[str],
                  output: Path, verdict_path: Path) -> int:
    """Run the stage ``name`` (``kind`` "train" or "command", its process ``argv``) with its
    output appended to ``output``; write the verdict to ``verdict_path``; the job's exit
    code (0 only when the stage is done)."""
    from remoteops.plugins import get_plugin_manager, health_rules

    settings = run_settings(run_dir, root)
    pm = get_plugin_manager(root, settings["plugins_dir"])
    stage = {"name": name, "kind": kind, "warnings": [], "outputs": {}, "status": "running"}
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))  # scancel, a time limit
    _hook(pm, "before_stage", stage, run_dir, settings)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if kind == "train" and restarts and "--resume" not in argv:
        _say(output, f"job requeued (restart {restarts}): resuming from the latest checkpoint")
        argv = [*argv, "--resume", "latest"]
    if kind == "command":
        _, _, log = command_stage.prepare(settings, settings["stages"].get(name, {}), name,
                                          run_dir, root)
        log["rules"] = health_rules(pm, settings)
        watch = StageWatch.for_stage(settings, run_dir, stage, log)
    else:  # the trainer judges its own health in-process; the window still counts
        watch = StageWatch.for_stage(settings, run_dir, stage, obey_failed=False)
    process = StageProcess(root, stop_grace(settings))
    result = process.run(argv, output, {}, watch, cancelled=lambda: bool(stopped))
    if kind == "train":
        ok, klass, reason = train_stage.judge(run_dir, name, result, output)
    else:
        ok, klass, reason = command_stage.judge(result)
    if stopped:
        ok, klass, reason = False, "cancelled", "the job was stopped (scancel or its time limit)"
    if ok and kind == "train":
        _after_training(process, stage, run_dir, output)
    if ok:
        stage["status"] = "done"
        _hook(pm, "after_stage", stage, run_dir, settings, status="done")
    write_atomic_text(verdict_path, json.dumps({
        "ok": ok, "failure_class": klass, "reason": reason, "code": result.code,
        "health": stage.get("health"), "warnings": stage["warnings"],
        "outputs": stage["outputs"], "job": os.environ.get("SLURM_JOB_ID")}) + "\n")
    if not ok:
        _say(output, f"stage {name} failed in job {os.environ.get('SLURM_JOB_ID')}: {klass}: "
                     f"{reason}")
    return 0 if ok else (result.code or 1)


def _after_training(process: StageProcess, stage: dict, run_dir: Path, output: Path) -> None:
    """The evaluation, then the post-eval and quantization plugins (as the runner would)."""
    _say(output, f"evaluation and after-stage plugins in job {os.environ.get('SLURM_JOB_ID')}")
    name = stage["name"]
    result = process.run(agent_args("eval", "--stage", name, "--run-dir", str(run_dir)),
                         output, {})
    report = run_dir / f"eval_report_{name}.json"
    if result.code != 0 or not report.is_file():
        stage["warnings"].append(f"evaluation failed (exit {result.code}); see logs/{name}.log")
        return
    stage["outputs"]["eval_report"] = report.name
    result = process.run(agent_args("after-stage", "--stage", name, "--run-dir", str(run_dir)),
                         output, {})
    if result.code != 0:
        stage["warnings"].append(f"post-eval/quantization plugins failed (exit {result.code}); "
                                 f"see logs/{name}.log")


__all__ = ["run_stage_job"]
