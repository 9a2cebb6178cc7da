"""The detached pipeline runner: runs a run's stages in order, applying the failure policy.

Started by ``remoteops-agent pipeline-start`` in its own session; it holds the
project's pipeline lock (inherited, already locked), beats
``runner.heartbeat``, and rewrites ``state.json`` after every transition.
SIGTERM (``invoke cancel``) stops the current stage's whole process tree and
marks the run cancelled.

A stage's processes run through ``server/stage_process`` (output piped to the
log, the whole tree stopped at the end; each attempt judged on its own output); its main
process is started by the stage's executor (``register_executors``: ``process``,
``torchrun``, a plugin's), recorded in the state; consecutive stages whose executor chains
them (``slurm``: jobs submitted at once) run through its ``run_chain`` (``server/stage_chain``);
a command stage's specifics are in ``server/command_stage``. Whatever goes wrong inside the runner itself, the stage is
marked failed with the reason and the later stages skipped, never left
"running".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from remoteops.common.clock import now_iso
from remoteops.common.errors import ConfigError
from remoteops.common.files import write_atomic_text
from remoteops.common.runs import (MIN_HEARTBEAT_S, load_state, pipeline_lock,
                                   process_identity, run_settings, save_state, stop_grace)
from remoteops.executors import CannotRun, Launch
from remoteops.server.pipeline import ChildResult, agent_args
from remoteops.server import node_part, train_stage
from remoteops.server.stage_chain import chain_from
from remoteops.server.stage_process import StageProcess
from remoteops.server.stagewatch import StageWatch

class Runner:
    def __init__(self, project_root: Path, run_dir: Path, lock_fd: int | None = None):
        self.root = project_root
        self.run_dir = run_dir
        self.lock_fd = lock_fd
        self.state = load_state(run_dir)
        self.settings = run_settings(run_dir, project_root)  # as the run started: loaded once
        self.grace = stop_grace(self.settings)
        self.cancelled = False
        self.process = StageProcess(project_root, self.grace)
        self.stage: dict | None = None  # the stage running now
        self._stop_beat = threading.Event()
        self.pm = None

    # -- plumbing --------------------------------------------------------------------------
    def save(self) -> None:
        save_state(self.run_dir, self.state)

    def log(self, message: str) -> None:
        line = f"{now_iso()} {message}"
        print(line, flush=True)

    def _beat(self) -> None:
        try:
            every = float(self.state["options"]["heartbeat_seconds"])
        except (KeyError, TypeError, ValueError):
            every = 2.0
        every = max(MIN_HEARTBEAT_S, every)  # 0 or less must not spin a core
        while True:
            write_atomic_text(self.run_dir / "runner.heartbeat",
                              json.dumps({"time": time.time(), "pid": os.getpid()}))
            if self._stop_beat.wait(every):
                return

    def _on_term(self, signum, frame) -> None:
        # the stage loop sees it within 0.2 s and stops the stage's whole tree
        self.cancelled = True

    def hooks(self):
        if self.pm is None:
            from remoteops.plugins import get_plugin_manager

            self.pm = get_plugin_manager(self.root, self.settings["plugins_dir"])
        return self.pm.hook

    def executor(self, stage: dict):
        """The stage's executor (``register_executors``), recorded in the state."""
        from remoteops.plugins import executor_for

        self.hooks()
        executor = executor_for(self.pm, self.settings, stage["name"])
        node_part.bind(executor, self.state, stage["name"])  # a run spanning several hosts
        stage["executor"] = executor.describe()
        return executor

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> int:
        from remoteops.server.proctree import become_subreaper

        signal.signal(signal.SIGTERM, self._on_term)
        become_subreaper()  # a stage's daemonising grandchildren stay in our tree
        lock = pipeline_lock(self.root, f"pipeline {self.state['run_id']}", fd=self.lock_fd)
        if self.lock_fd is None:
            lock.acquire()  # started by hand, not through pipeline-start
        else:  # ours alone: a process a plugin starts must not keep the root locked
            os.set_inheritable(self.lock_fd, False)
        lock.update(run_id=self.state["run_id"])
        self.state["runner"] = {"pid": os.getpid(), "host": os.uname().nodename,
                                "started": now_iso(), "identity": process_identity()}
        self.state["status"] = "running"
        self.save()
        threading.Thread(target=self._beat, daemon=True).start()
        try:
            for stage in self.state["stages"]:
                if stage["status"] in ("done", "skipped"):
                    continue
                if stage["kind"] == "collect":
                    stage["status"] = "pending"
                    stage["reason"] = "runs on the laptop: invoke collect"
                    continue
                if self.cancelled:
                    self._skip_rest(stage, including=True)
                    break
                chain = chain_from(self, stage)  # consecutive stages one executor chains
                try:
                    ok, stage = (chain[0].run_chain(self, chain[1]) if chain else
                                 (self.run_stage(stage), stage))
                except Exception as exc:  # a runner bug or an input we did not foresee
                    stage = self.stage if chain and self.stage else stage
                    ok = self._internal_failure(stage, exc)
                if not ok:
                    self._skip_rest(stage)
                    break
            self.state["status"] = ("cancelled" if self.cancelled or any(  # a scancel too
                s["status"] == "cancelled" for s in self.state["stages"]) else
                                    "failed" if any(s["status"] == "failed"
                                                    for s in self.state["stages"]) else "done")
        except BaseException as exc:  # record whatever kills the runner itself
            self.state["status"] = "failed"
            self.state["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._settle_unfinished()
            self.state["finished"] = now_iso()
            self.log(f"run {self.state['run_id']} {self.state['status']}")
            self.save()
            self._write_reports()
            self._stop_beat.set()
            # last write: the laptop collects once it sees the runner has exited
            self.state["runner"]["exited"] = now_iso()
            self.save()
            lock.release()
        return 0 if self.state["status"] == "done" else 1

    def _internal_failure(self, stage: dict, exc: Exception) -> bool:
        self.log("".join(traceback.format_exception(exc)).rstrip())
        if self.process.running:
            self.process.stop_tree()
        reason = f"the runner failed: {type(exc).__name__}: {exc}"[:300]
        if stage["attempts"] and "ended" not in stage["attempts"][-1]:
            stage["attempts"][-1].update(ended=now_iso(), failure_class="internal",
                                         reason=reason)
        stage.update(status="failed", ended=now_iso(), failure_class="internal", reason=reason)
        stage.pop("process", None)
        self.save()
        return False

    def _settle_unfinished(self) -> None:
        """No stage may stay "running" once the runner stops."""
        failed = None
        for stage in self.state["stages"]:
            if stage["status"] == "running":
                stage.update(status="cancelled" if self.cancelled else "failed",
                             ended=now_iso(), failure_class=stage.get("failure_class") or (
                                 "cancelled" if self.cancelled else "internal"),
                             reason=stage.get("reason") or self.state.get("error")
                             or "the runner stopped")
                failed = failed or stage
        if failed is not None:
            self._skip_rest(failed)

    def _skip_rest(self, failed: dict, including: bool = False) -> None:
        after = False
        for stage in self.state["stages"]:
            if stage is failed:
                after = True
                if not including:
                    continue
            if after and stage["status"] not in ("done", "skipped"):
                stage["status"] = "cancelled" if self.cancelled else "skipped"
                stage["reason"] = ("run cancelled" if self.cancelled else
                                   f"stage {failed['name']} failed ({failed['failure_class']})")
        self.save()

    def _write_reports(self) -> None:
        try:
            from remoteops.server.reports import write_training_summary

            write_training_summary(self.run_dir, self.settings, pm=self.pm)
        except Exception as exc:  # a report problem must not hide the run's outcome
            self.log(f"could not write the report: {type(exc).__name__}: {exc}")
        try:
            from remoteops.server.postprocess import write_closure_report
        except ModuleNotFoundError:
            return
        try:
            write_closure_report(self.run_dir, self.settings)
        except Exception as exc:
            self.log(f"could not write the closure report: {type(exc).__name__}: {exc}")

    # -- one stage -------------------------------------------------------------------------
    def run_stage(self, stage: dict) -> bool:
        from remoteops.trainer.checkpoints import latest_checkpoint

        self.stage = stage
        overrides: dict[str, int] = {}
        checkpoints = self.run_dir / "checkpoints" / stage["name"]
        if stage.pop("fresh", False):  # chosen with --stages: run it again from the start
            shutil.rmtree(checkpoints, ignore_errors=True)
        # an interrupted stage (runner killed, resumed run) continues from its checkpoint
        resume = stage["kind"] == "train" and latest_checkpoint(checkpoints) is not None
        while True:
            stage["attempt"] += 1
            stage.update(status="running", started=stage["started"] or now_iso(),
                         failure_class=None, reason=None)
            attempt = {"n": stage["attempt"], "started": now_iso(), "resume": resume,
                       "overrides": dict(overrides)}
            stage["attempts"].append(attempt)
            self.save()
            self.log(f"stage {stage['name']} attempt {stage['attempt']} started")
            self._call_hook("before_stage", stage)
            t0 = time.time()
            if os.environ.get("REMOTEOPS_TEST_RUNNER_FAULT") == stage["name"]:
                raise RuntimeError("fault injected by REMOTEOPS_TEST_RUNNER_FAULT")
            ok, klass, reason = self._execute(stage, resume, overrides)
            attempt.update(ended=now_iso(), seconds=round(time.time() - t0, 2),
                           failure_class=klass, reason=reason)
            stage.pop("process", None)
            if self.cancelled:
                ok, klass, reason = False, "cancelled", "cancelled by invoke cancel"
            if ok:
                stage.update(status="done", ended=now_iso())
                stage["duration_s"] = round(sum(a.get("seconds", 0) for a in stage["attempts"]), 2)
                self.save()
                self._call_hook("after_stage", stage)
                self.log(f"stage {stage['name']} done")
                return True
            klass, reason = node_part.judged(self.state, stage["name"], klass, reason)
            retry = False  # one node alone cannot retry a stage that spans several
            if node_part.retries(self.state, stage["name"]):
                retry, resume, overrides, reason = train_stage.next_attempt(
                    self.settings, stage, klass, reason, resume, overrides)
            if retry:
                continue
            stage.update(status="cancelled" if klass == "cancelled" else "failed",
                         ended=now_iso(), failure_class=klass, reason=reason)
            stage["duration_s"] = round(sum(a.get("seconds", 0) for a in stage["attempts"]), 2)
            self.save()
            self._call_hook("after_stage", stage)
            self.log(f"stage {stage['name']} {stage['status']}: {klass}: {reason}")
            return False

    def _call_hook(self, name: str, stage: dict) -> None:
        try:
            hook = getattr(self.hooks(), name)
            kwargs = {"stage": stage["name"], "run_dir": str(self.run_dir),
                      "settings": self.settings}
            if name == "after_stage":
                kwargs["status"] = stage["status"]
            hook(**kwargs)
        except Exception as exc:  # a plugin's bug is recorded, not fatal
            stage["warnings"].append(f"{name} hook raised {type(exc).__name__}: {exc}")

    def _execute(self, stage: dict, resume: bool, overrides: dict) -> tuple[bool, str | None,
                                                                            str | None]:
        kind = stage["kind"]
        if kind == "precheck":
            return self._precheck(stage)
        log_path = self.run_dir / "logs" / f"{stage['name']}.log"
        try:
            executor = self.executor(stage)
        except ConfigError as exc:
            return False, "config", str(exc)
        try:  # an executor that cannot run the stage says why (CannotRun): a config error
            if kind == "command":
                return self._command(stage, log_path, executor)
            return self._train(stage, log_path, executor, resume, overrides)
        except CannotRun as exc:
            return False, "config", str(exc)

    def _train(self, stage: dict, log_path: Path, executor, resume: bool, overrides: dict
               ) -> tuple[bool, str | None, str | None]:
        args = train_stage.agent_train_args(self.run_dir, stage, resume, overrides)
        launch = Launch(stage["name"], "train", agent_args(*args), python=sys.executable,
                        module="remoteops.agent", args=args)
        result = self._launch(executor, launch, log_path, StageWatch.for_stage(
            self.settings, self.run_dir, stage, obey_failed=False))  # the health window
        ok, klass, reason = train_stage.judge(self.run_dir, stage["name"], result, log_path)
        if ok and node_part.evaluates(self.state):  # node 0 of a spanning run holds the adapter
            stage["outputs"]["adapter"] = f"outputs/adapter/adapter_{stage['name']}"
            self._after_training(stage, log_path)
        return ok, klass, reason

    def _after_training(self, stage: dict, log_path: Path) -> None:
        """Evaluate, then the configured post-eval and quantization plugins (unless the
        executor ran both at the end of the stage's own job: slurm)."""
        in_job = stage["executor"].get("after_training") == "in the job"
        result = ChildResult(0) if in_job else self._child(agent_args(
            "eval", "--stage", stage["name"], "--run-dir", str(self.run_dir)), log_path, {})
        report = self.run_dir / f"eval_report_{stage['name']}.json"
        if result.code != 0 or not report.is_file():
            stage["warnings"].append(f"evaluation failed (exit {result.code}); see "
                                     f"logs/{stage['name']}.log")
            return
        stage["outputs"]["eval_report"] = report.name
        if in_job:
            return
        result = self._child(agent_args("after-stage", "--stage", stage["name"], "--run-dir",
                                        str(self.run_dir)), log_path, {})
        if result.code != 0:
            stage["warnings"].append(f"post-eval/quantization plugins failed (exit "
                                     f"{result.code}); see logs/{stage['name']}.log")

    def _precheck(self, stage: dict) -> tuple[bool, str | None, str | None]:
        return train_stage.precheck(self.settings, self.root, self.run_dir, stage)

    def _command(self, stage: dict, log_path: Path, executor) -> tuple[bool, str | None,
                                                                          str | None]:
        from remoteops.plugins import health_rules
        from remoteops.server import command_stage

        self.hooks()  # the plugin manager, loaded once
        table = self.settings["stages"].get(stage["name"], {})
        try:
            args, env, log = command_stage.prepare(self.settings, table, stage["name"],
                                                   self.run_dir, self.root)
        except ValueError as exc:
            return False, "config", str(exc)
        log["rules"] = health_rules(self.pm, self.settings)
        watch = StageWatch.for_stage(self.settings, self.run_dir, stage, log)
        python, module, script, rest = command_stage.python_program(args[-1]) or (None,) * 4
        result = self._launch(executor, Launch(stage["name"], "command", args, env, python,
                                               module, script, rest or []), log_path, watch)
        ok, klass, reason = command_stage.judge(result)
        if ok:
            command_stage.record_outputs(self.root, stage, table)
        return ok, klass, reason

    def _callbacks(self) -> dict:
        def started(pid: int) -> None:  # recorded: cancel finds the tree if the runner dies
            if self.stage is not None:
                self.stage["process"] = process_identity(pid)
                self.save()

        return {"on_start": started, "cancelled": lambda: self.cancelled,
                "on_change": self.save}

    def _on_job(self, job_id: str, **info) -> None:
        """A batch job (slurm) runs the stage: status shows it (queued or not), cancel ends it."""
        self.stage["executor"].update(info, job=job_id)
        self.stage["attempts"][-1]["job"] = job_id
        self.save()

    def _launch(self, executor, launch: Launch, log_path: Path,
                watch: StageWatch) -> ChildResult:
        """The stage's main process, run the executor's way (CannotRun when it cannot)."""
        return executor.run(launch, self.process, log_path, watch, **self._callbacks(),
                            on_job=self._on_job)

    def _child(self, args: list[str], log_path: Path, env: dict[str, str],
               watch: StageWatch | None = None) -> ChildResult:
        """One plain process of the stage (``server/stage_process``): eval, after-stage."""
        return self.process.run(args, log_path, env, watch, **self._callbacks())

def main(project_root: str, run_dir: str, lock_fd: int | None = None) -> int:
    return Runner(Path(project_root).resolve(), Path(run_dir).resolve(), lock_fd).run()
