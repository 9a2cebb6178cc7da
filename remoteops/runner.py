"""The detached pipeline runner: runs a run's stages in order, applying the failure policy.

Started by ``remoteops-agent pipeline-start`` in its own session; it holds the
project's pipeline lock, beats ``runner.heartbeat``, and rewrites
``state.json`` after every transition. SIGTERM (``invoke cancel``) stops the
current stage's process group and marks the run cancelled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from remoteops.config import load_settings
from remoteops.locks import FileLock
from remoteops.pipeline import (POLICY, ChildResult, _die_with_parent, agent_args, load_state,
                                now_iso, save_state)
from remoteops.trainer.rundir import write_atomic


class Runner:
    def __init__(self, project_root: Path, run_dir: Path):
        self.root = project_root
        self.run_dir = run_dir
        self.settings = load_settings(project_root)
        self.state = load_state(run_dir)
        self.cancelled = False
        self.child: subprocess.Popen | None = None
        self._stop_beat = threading.Event()
        self.pm = None

    # -- plumbing --------------------------------------------------------------------------
    def save(self) -> None:
        save_state(self.run_dir, self.state)

    def log(self, message: str) -> None:
        line = f"{now_iso()} {message}"
        print(line, flush=True)

    def _beat(self) -> None:
        every = float(self.state["options"]["heartbeat_seconds"])
        while True:
            write_atomic(self.run_dir / "runner.heartbeat",
                         json.dumps({"time": time.time(), "pid": os.getpid()}))
            if self._stop_beat.wait(every):
                return

    def _on_term(self, signum, frame) -> None:
        self.cancelled = True
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()

    def hooks(self):
        if self.pm is None:
            from remoteops.plugins import get_plugin_manager

            self.pm = get_plugin_manager(self.root, self.settings["plugins_dir"])
        return self.pm.hook

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        lock = FileLock(self.root / ".remoteops" / "pipeline.lock",
                        f"pipeline {self.state['run_id']}")
        held = lock.read()
        if held and held.get("pid") != os.getpid():
            lock.acquire()  # pipeline-start normally hands the lock over to us
        self.state["runner"] = {"pid": os.getpid(), "host": os.uname().nodename,
                                "started": now_iso()}
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
                if self.cancelled or not self.run_stage(stage):
                    self._skip_rest(stage)
                    break
            self.state["status"] = ("cancelled" if self.cancelled else
                                    "failed" if any(s["status"] == "failed"
                                                    for s in self.state["stages"]) else "done")
        except BaseException as exc:  # record whatever kills the runner itself
            self.state["status"] = "failed"
            self.state["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
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

    def _skip_rest(self, failed: dict) -> None:
        after = False
        for stage in self.state["stages"]:
            if stage is failed:
                after = True
                continue
            if after and stage["status"] not in ("done", "skipped"):
                stage["status"] = "cancelled" if self.cancelled else "skipped"
                stage["reason"] = ("run cancelled" if self.cancelled else
                                   f"stage {failed['name']} failed ({failed['failure_class']})")
        self.save()

    def _write_reports(self) -> None:
        try:
            from remoteops.reports import write_training_summary

            write_training_summary(self.run_dir, self.settings)
        except Exception as exc:  # a report problem must not hide the run's outcome
            self.log(f"could not write the report: {type(exc).__name__}: {exc}")
        try:
            from remoteops.postprocess import write_closure_report
        except ModuleNotFoundError:
            return
        try:
            write_closure_report(self.run_dir, self.settings)
        except Exception as exc:
            self.log(f"could not write the closure report: {type(exc).__name__}: {exc}")

    # -- one stage -------------------------------------------------------------------------
    def run_stage(self, stage: dict) -> bool:
        from remoteops.trainer.checkpoints import latest_checkpoint

        overrides: dict[str, str] = {}
        checkpoints = self.run_dir / "checkpoints" / stage["name"]
        if stage.pop("fresh", False):  # chosen with --stages: run it again from the start
            shutil.rmtree(checkpoints, ignore_errors=True)
        # an interrupted stage (runner killed, resumed run) continues from its checkpoint
        resume = stage["kind"] == "train" and latest_checkpoint(checkpoints) is not None
        max_retries = int(self.settings["pipeline.max_retries"])
        oom_retries = int(self.settings["pipeline.oom_retries"])
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
            ok, klass, reason = self._execute(stage, resume, overrides)
            attempt.update(ended=now_iso(), seconds=round(time.time() - t0, 2),
                           failure_class=klass, reason=reason)
            if self.cancelled:
                ok, klass, reason = False, "cancelled", "cancelled by invoke cancel"
            if ok:
                stage.update(status="done", ended=now_iso())
                stage["duration_s"] = round(sum(a.get("seconds", 0) for a in stage["attempts"]), 2)
                self.save()
                self._call_hook("after_stage", stage)
                self.log(f"stage {stage['name']} done")
                return True
            action = POLICY.get(klass, "fail")
            retries = len(stage["attempts"]) - 1
            if action == "smaller_batch" and sum(1 for a in stage["attempts"]
                                                 if a.get("failure_class") == "oom") <= oom_retries:
                overrides = self._smaller_batch(stage, overrides)
                stage["warnings"].append(f"attempt {stage['attempt']}: out of memory; retrying "
                                         f"with batch {overrides['batch_size']} and gradient "
                                         f"accumulation {overrides['grad_accum']}")
                continue
            if action == "resume" and retries < max_retries:
                resume = stage["kind"] == "train"
                stage["warnings"].append(f"attempt {stage['attempt']}: {klass} ({reason}); "
                                         f"retrying{' from the latest checkpoint' if resume else ''}")
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

    def _smaller_batch(self, stage: dict, overrides: dict) -> dict:
        from remoteops.trainer.stageconf import resolve_stage

        cfg = resolve_stage(self.settings, stage["name"])
        batch = int(overrides.get("batch_size", cfg.train["batch_size"]))
        accum = int(overrides.get("grad_accum", cfg.train["grad_accum"]))
        return {"batch_size": str(max(1, batch // 2)), "grad_accum": str(accum * 2)}

    def _execute(self, stage: dict, resume: bool, overrides: dict) -> tuple[bool, str | None,
                                                                            str | None]:
        kind = stage["kind"]
        if kind == "precheck":
            return self._precheck(stage)
        log_path = self.run_dir / "logs" / f"{stage['name']}.log"
        if kind == "command":
            return self._command(stage, log_path)
        env = {f"REMOTEOPS_STAGES__{stage['name'].upper()}__TRAIN__{k.upper()}": v
               for k, v in overrides.items()}
        args = ["train", "--stage", stage["name"], "--run-dir", str(self.run_dir)]
        if resume:
            args += ["--resume", "latest"]
        result = self._child(agent_args(*args), log_path, env)
        if result.code == 0:
            stage["outputs"]["adapter"] = f"outputs/adapter/adapter_{stage['name']}"
            self._after_training(stage, log_path)
            return True, None, None
        failed = self._signal(stage["name"], "failed")
        if result.code == 2:
            return False, (failed or {}).get("reason", "config"), self._last_error(log_path)
        if failed and failed.get("reason") in POLICY and failed["reason"] != "process_died":
            return False, failed["reason"], failed.get("message", "")
        return False, "process_died", f"the trainer exited with {result.code}"

    def _after_training(self, stage: dict, log_path: Path) -> None:
        """Evaluate, then the configured post-eval and quantization plugins."""
        result = self._child(agent_args("eval", "--stage", stage["name"], "--run-dir",
                                        str(self.run_dir)), log_path, {})
        report = self.run_dir / f"eval_report_{stage['name']}.json"
        if result.code != 0 or not report.is_file():
            stage["warnings"].append(f"evaluation failed (exit {result.code}); see "
                                     f"logs/{stage['name']}.log")
            return
        stage["outputs"]["eval_report"] = report.name
        result = self._child(agent_args("after-stage", "--stage", stage["name"], "--run-dir",
                                        str(self.run_dir)), log_path, {})
        if result.code != 0:
            stage["warnings"].append(f"post-eval/quantization plugins failed (exit "
                                     f"{result.code}); see logs/{stage['name']}.log")

    def _signal(self, stage: str, name: str) -> dict | None:
        path = self.run_dir / f"{stage}.{name}.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    @staticmethod
    def _last_error(log_path: Path) -> str:
        try:
            lines = log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "no log"
        errors = [l for l in lines if l.startswith("error: ")]
        return (errors[-1][7:] if errors else (lines[-1] if lines else "no output"))[:300]

    def _precheck(self, stage: dict) -> tuple[bool, str | None, str | None]:
        from remoteops.config import load_settings as load
        from remoteops.precheck import run_precheck
        from remoteops.targets import LocalTarget

        settings = load(self.root, flags={"gpu_gate": self.state["options"]["gpu_gate"]})
        target = LocalTarget("server", str(self.root), sys.executable)
        results = run_precheck(settings, target)
        rows = [r.to_dict() for r in results]
        write_atomic(self.run_dir / "precheck.json", json.dumps(rows, indent=1) + "\n")
        stage["outputs"]["precheck"] = "precheck.json"
        stage["warnings"] += [f"{r['name']}: {r['value']}" for r in rows if r["status"] == "warn"]
        failed = [r for r in rows if r["status"] == "fail"]
        if failed:
            return False, "config", "; ".join(f"{r['name']}: {r['value']}" for r in failed[:3])
        return True, None, None

    def _command(self, stage: dict, log_path: Path) -> tuple[bool, str | None, str | None]:
        from remoteops.trainer.logwatch import check_log

        table = self.settings["stages"].get(stage["name"], {})
        command = str(table["command"]).format(stage=stage["name"], run_dir=self.run_dir,
                                               project_root=self.root)
        pattern = table.get("loss_pattern") or self.settings["health.loss_pattern"] or None
        watch = {"pattern": pattern, "loss_max": float(self.settings["health.loss_max"]),
                 "explode_ratio": float(self.settings["health.explode_ratio"])}
        result = self._child(["bash", "-c", command], log_path,
                             {"REMOTEOPS_STAGE": stage["name"],
                              "REMOTEOPS_RUN_DIR": str(self.run_dir)}, watch=watch)
        if result.killed_for:
            return False, result.killed_for, result.message
        if result.code == 0:
            verdict = check_log(log_path, **watch, stale_seconds=1e9)
            if not verdict.ok and verdict.reason in POLICY:
                return False, verdict.reason, verdict.message
            return True, None, None
        verdict = check_log(log_path, **watch, stale_seconds=1e9)
        if not verdict.ok and verdict.reason in POLICY:
            return False, verdict.reason, verdict.message
        return False, "process_died", f"the command exited with {result.code}"

    def _child(self, args: list[str], log_path: Path, env: dict[str, str],
               watch: dict | None = None) -> ChildResult:
        """Run a stage's process in our group; stop it on cancel or a bad log verdict."""
        from remoteops.trainer.logwatch import check_log

        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"\n==> {' '.join(args)}\n".encode())
            log.flush()
            self.child = subprocess.Popen(args, cwd=str(self.root), stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, **env},
                                          preexec_fn=_die_with_parent)
        killed_for, message = None, ""
        last_check = time.monotonic()
        while self.child.poll() is None:
            time.sleep(0.2)
            if self.cancelled:
                self._stop_child()
                break
            if watch and time.monotonic() - last_check > 1.0:
                last_check = time.monotonic()
                verdict = check_log(log_path, **watch, stale_seconds=1e9)
                if not verdict.ok and verdict.reason in POLICY:
                    killed_for, message = verdict.reason, verdict.message
                    self._stop_child()
                    break
        code = self.child.wait()
        self.child = None
        return ChildResult(code, killed_for, message)

    def _stop_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()


def main(project_root: str, run_dir: str) -> int:
    return Runner(Path(project_root).resolve(), Path(run_dir).resolve()).run()
