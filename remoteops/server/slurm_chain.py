"""Consecutive Slurm stages submitted at once, as one chain of jobs, and followed together.

What ``[slurm] chain = "upfront"`` (the default) does with two or more Slurm stages in a row
(``plugins/slurm.py`` calls ``run_slurm_chain``): every stage's job is submitted before the
first one runs, job k with ``--dependency=afterok:<job k-1> --kill-on-invalid-dep=yes``, so
the cluster queues the whole chain and starts each job the moment the one before completes.
Each job runs its stage through the agent's ``stage-job`` (``server/slurm_job_entry``): the
``before_stage``/``after_stage`` hooks and the stage's verdict run inside the job, which exits
non-zero unless the stage is done, so a failed stage makes Slurm cancel every job behind it
(``DependencyNeverSatisfied``); nothing is left pending.

The runner follows all the jobs with one ``squeue -j ID1,ID2,...`` per poll, copies the
running job's output into its stage's log, records each stage's job and why it waits
(``queued (Dependency)``) in ``state.json``, and when a job ends reads the verdict its stage
wrote. A retryable failure (a time limit, a preemption, a lost node, out of memory, a dead
process within ``max_retries``) submits the failed stage again (``--resume latest``, or the
halved batch) with the rest of the chain behind it; otherwise the stages behind are skipped,
with the state Slurm gave their jobs. ``cancel`` cancels every job of the chain.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from remoteops.common.clock import now_iso
from remoteops.common.rundir import RunDir
from remoteops.executors import Launch
from remoteops.server import command_stage, slurm_jobs, train_stage
from remoteops.server.pipeline import agent_args
from remoteops.server.slurm_stage import TICK, copy_output, last_ok, remember_ok

SLURM_CANCELS_WITHIN_S = 30.0  # then the runner cancels what Slurm left behind a failed job


def run_slurm_chain(runner: Any, stages: list[dict]) -> tuple[bool, dict]:
    """Run ``stages`` as one chain of jobs; ``(ok, the last stage it ran)``."""
    return Chain(runner, stages).run()


class _Job:
    """One submitted job of the chain: its stage, its files, what squeue said last."""

    def __init__(self, stage: dict, job: str, output: Path, verdict: Path, log: Path):
        self.stage, self.id, self.output, self.verdict, self.log = stage, job, output, verdict, log
        self.state, self.reason = "PENDING", ""
        self.pos = 0
        self.unseen = 0
        self.confirmed = False  # a state the cluster may take back, seen twice
        self.attempt: dict | None = None  # the stage's attempt, once the job runs
        self.t0 = 0.0
        self.requeued = False

    @property
    def final(self) -> bool:
        return self.state in slurm_jobs.FINAL

    def copy(self) -> None:
        """Append what the job wrote since the last copy to the stage's log."""
        self.pos = copy_output(self.output, self.pos, self.log)

    def note(self, line: str) -> None:
        with open(self.log, "ab") as log:
            log.write(f"==> {line}\n".encode())


class Chain:
    def __init__(self, runner: Any, stages: list[dict]):
        self.r, self.stages, self.run_dir = runner, stages, runner.run_dir
        self.executors = {s["name"]: runner.executor(s) for s in stages}
        self.options = {name: e.sbatch_options for name, e in self.executors.items()}
        self.poll_s = max(0.2, min(float(o.get("poll_seconds") or 1.0)
                                   for o in self.options.values()))
        self.resume: dict[str, bool] = {}
        self.overrides: dict[str, dict] = {s["name"]: {} for s in stages}
        self.jobs: dict[str, _Job] = {}  # stage name -> its current job
        self.refused: dict[str, str] = {}  # stage name -> why it could not be submitted

    # -- the chain -------------------------------------------------------------------------
    def run(self) -> tuple[bool, dict]:
        from remoteops.trainer.checkpoints import latest_checkpoint

        self.r.stage = self.stages[0]
        for stage in self.stages:
            checkpoints = self.run_dir / "checkpoints" / stage["name"]
            if stage.pop("fresh", False):  # chosen with --stages: run it again from the start
                shutil.rmtree(checkpoints, ignore_errors=True)
            self.resume[stage["name"]] = (stage["kind"] == "train"
                                          and latest_checkpoint(checkpoints) is not None)
        self._cancel_leftovers()
        self.submit(0)
        try:
            return self.follow()
        except BaseException:  # the runner fails the stage; no job may run on unwatched
            slurm_jobs.cancel([j.id for j in self.jobs.values() if not j.final])
            raise

    def _cancel_leftovers(self) -> None:
        """A resumed run: jobs the dead runner left queued or running must not run on
        beside the new chain."""
        left = slurm_jobs.cancel_leftovers(slurm_jobs.recorded_jobs(self.r.state))
        if left:
            message = (f"cancelled Slurm jobs {', '.join(left)} left by this run's previous "
                       "runner")
            self.stages[0]["warnings"].append(message)
            self.r.log(message)

    def submit(self, k: int) -> None:
        """Submit stage k and every stage after it, each job afterok on the one before."""
        after = self.jobs[self.stages[k - 1]["name"]].id if k else last_ok(self.run_dir)
        submitted = []
        for stage in self.stages[k:]:
            self.jobs.pop(stage["name"], None)
            self.refused.pop(stage["name"], None)
        for stage in self.stages[k:]:
            try:
                job = self._submit_one(stage, after)
            except (slurm_jobs.SlurmError, ValueError) as exc:  # an unknown partition ...
                self.refused[stage["name"]] = f"stage {stage['name']}: {exc}"
                break
            submitted.append({"stage": stage["name"], "job": job.id, "after": after})
            after = job.id
        self.r.state.setdefault("slurm_chains", []).append(
            {"submitted": now_iso(), "jobs": submitted})
        self.r.log("slurm chain submitted: " + ", ".join(
            f"{j['stage']} job {j['job']}" for j in submitted))
        self.r.save()

    def _submit_one(self, stage: dict, after: str | None) -> _Job:
        name = stage["name"]
        folder = self.run_dir / "slurm"
        folder.mkdir(parents=True, exist_ok=True)
        n = 1 + len(list(folder.glob(f"{name}.*.sbatch")))
        script, output = folder / f"{name}.{n}.sbatch", folder / f"{name}.{n}.out"
        verdict = folder / f"{name}.{n}.verdict.json"
        if stage["kind"] == "train":
            args = train_stage.agent_train_args(self.run_dir, stage, self.resume[name],
                                                self.overrides[name])
            launch = Launch(name, "train", agent_args(*args), python=sys.executable,
                            module="remoteops.agent", args=args)
        else:
            argv, env, _ = command_stage.prepare(self.r.settings,
                                                 self.r.settings["stages"].get(name, {}), name,
                                                 self.run_dir, self.r.root)
            python, module, program, rest = command_stage.python_program(argv[-1]) or (None,) * 4
            launch = Launch(name, "command", argv, env, python, module, program, rest or [])
        argv, env = self.executors[name].wrap(launch), launch.env  # torchrun in the job
        wrapper = agent_args("stage-job", "--root", str(self.r.root), "--run-dir",
                             str(self.run_dir), "--stage", name, "--kind", stage["kind"],
                             "--output", str(output), "--verdict", str(verdict), "--", *argv)
        script.write_text(slurm_jobs.batch_script(
            f"remoteops-{self.run_dir.name.removeprefix('run_')}-{name}", wrapper, env,
            self.r.root, output, self.options[name], False))
        job_id = slurm_jobs.submit(script, after)
        log = self.run_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        job = _Job(stage, job_id, output, verdict, log)
        job.note(f"sbatch job {job_id}{' after ' + after if after else ''} ({script.name}, "
                 f"chain): {' '.join(argv)}")
        self.jobs[name] = job
        stage["executor"].update(job=job_id, queued="submitted", chain="upfront")
        if stage["kind"] == "train":
            stage["executor"]["after_training"] = "in the job"
        return job

    # -- following -------------------------------------------------------------------------
    def follow(self) -> tuple[bool, dict]:
        k, last = 0, 0.0
        while True:
            time.sleep(TICK)
            for job in self.jobs.values():
                job.copy()
            head = self.stages[k]
            if self.r.cancelled:
                return self._cancel(head)
            if time.monotonic() - last < self.poll_s:
                continue
            last = time.monotonic()
            self._poll()
            job = self.jobs.get(head["name"])
            if job is None:  # it could not be submitted
                return self._fail(k, "config", self.refused.get(head["name"], "not submitted"))
            if not job.final or (job.state in slurm_jobs.MAY_COME_BACK and not job.confirmed):
                job.confirmed = job.final  # look once more next poll
                continue
            ok, klass, reason = self._judge(head, job)
            self._ended(head, job, klass, reason)
            if ok:
                self._done(head)
                k += 1
                if k == len(self.stages):
                    remember_ok(self.run_dir, job.id)
                    return True, head
                continue
            retry, resume, overrides, reason = train_stage.next_attempt(
                self.r.settings, head, klass, reason, self.resume[head["name"]],
                self.overrides[head["name"]])
            behind = self._behind_ended(k, klass)
            if retry and not self.r.cancelled:
                self.resume[head["name"]], self.overrides[head["name"]] = resume, overrides
                for other in behind:
                    other.stage["warnings"].append(
                        f"Slurm job {other.id} ended {other.state} ({other.reason}) when stage "
                        f"{head['name']} failed ({klass}); submitted again behind it")
                head.update(status="pending")
                self.submit(k)
                continue
            return self._fail(k, klass, reason, behind)

    def _poll(self) -> None:
        """One squeue for every job not yet final; what each stage waits for, in the state."""
        live = [j for j in self.jobs.values()
                if not j.final or j.state in slurm_jobs.MAY_COME_BACK]
        found = slurm_jobs.states(j.id for j in live)
        changed = False
        for job in live:
            if job.id in found:
                job.unseen = 0
                job.state, job.reason = found[job.id]
            else:
                job.unseen += 1
                if job.unseen >= 3:  # squeue forgot it (MinJobAge): ask sacct/scontrol
                    try:
                        job.state = slurm_jobs.final(job.id, tries=1)[0]
                    except slurm_jobs.SlurmError:
                        pass
            queued = (job.reason if job.reason not in ("", "None") else "waiting") \
                if job.state == "PENDING" else None
            if self.jobs.get(job.stage["name"]) is job and \
                    job.stage["executor"].get("queued") != queued:
                job.stage["executor"]["queued"] = queued
                changed = True
            if job.state == "RUNNING" and job.attempt is None:
                self._started(job)
                changed = True
            if job.attempt is not None and job.state in ("PENDING", "REQUEUED") and \
                    not job.requeued:
                job.requeued = True  # the cluster requeued it: it runs again under its id
                job.note(f"Slurm job {job.id} was requeued ({job.state}, {job.reason}); it "
                         "runs again under the same id")
            if job.state == "RUNNING":
                job.requeued = False
                changed |= self._health(job.stage)
        if changed:
            self.r.save()

    def _started(self, job: _Job) -> None:
        stage = job.stage
        stage["attempt"] += 1
        stage.update(status="running", started=stage.get("started") or now_iso(),
                     failure_class=None, reason=None)
        job.attempt = {"n": stage["attempt"], "started": now_iso(),
                       "resume": self.resume[stage["name"]],
                       "overrides": dict(self.overrides[stage["name"]]), "job": job.id}
        stage["attempts"].append(job.attempt)
        job.t0 = time.time()
        self.r.stage = stage
        self.r.log(f"stage {stage['name']} attempt {stage['attempt']} started (Slurm job "
                   f"{job.id})")

    def _health(self, stage: dict) -> bool:
        """The health the job's own watch signalled, for ``status``."""
        if stage.get("health"):
            return False
        signal = RunDir(self.run_dir, stage["name"]).read_signal("healthy")
        if signal is None:
            return False
        stage["health"] = {"status": "healthy", "how": str(signal.get("reason") or
                                                          "marked healthy"), "at": now_iso()}
        return True

    # -- a job's end -----------------------------------------------------------------------
    def _judge(self, stage: dict, job: _Job) -> tuple[bool, str | None, str | None]:
        """``(ok, failure class, reason)`` of the stage's ended job: Slurm's word for a job it
        ended (time limit, preemption, ...), else the verdict the stage wrote in its job."""
        job.copy()
        if job.attempt is None:  # it ran and ended between two polls
            self._started(job)
        if job.state in slurm_jobs.FAILURE_CLASS:
            job.note(f"stopped ({slurm_jobs.FAILURE_CLASS[job.state]}): Slurm job {job.id} "
                     f"ended {job.state}")
            return False, slurm_jobs.FAILURE_CLASS[job.state], (
                f"Slurm job {job.id} ended {job.state}" +
                (f" ({job.reason})" if job.reason not in ("", "None") else ""))
        try:
            verdict = json.loads(job.verdict.read_text())
        except (OSError, ValueError):
            verdict = None
        if verdict is None:  # the job died before its stage was judged
            try:
                code = slurm_jobs.final(job.id)[1]
            except slurm_jobs.SlurmError:
                code = -1
            return False, "process_died", (f"Slurm job {job.id} ended {job.state} (exit "
                                           f"{code}) without its stage's verdict; see "
                                           f"logs/{stage['name']}.log")
        for warning in verdict.get("warnings") or []:
            if warning not in stage["warnings"]:
                stage["warnings"].append(warning)
        if verdict.get("health") and not stage.get("health"):
            stage["health"] = verdict["health"]
        stage["outputs"].update(verdict.get("outputs") or {})
        return bool(verdict["ok"]), verdict.get("failure_class"), verdict.get("reason")

    def _ended(self, stage: dict, job: _Job, klass: str | None, reason: str | None) -> None:
        job.attempt.update(ended=now_iso(), seconds=round(time.time() - job.t0, 2),
                           failure_class=klass, reason=reason)
        stage["executor"]["queued"] = None

    def _done(self, stage: dict) -> None:
        stage.update(status="done", ended=now_iso())
        stage["duration_s"] = round(sum(a.get("seconds", 0) for a in stage["attempts"]), 2)
        if stage["kind"] == "train":
            stage["outputs"]["adapter"] = f"outputs/adapter/adapter_{stage['name']}"
        else:
            command_stage.record_outputs(self.r.root, stage,
                                         self.r.settings["stages"].get(stage["name"], {}))
        self.r.save()
        self.r.log(f"stage {stage['name']} done")

    def _behind_ended(self, k: int, klass: str | None) -> list[_Job]:
        """The jobs behind stage k once they ended: Slurm cancels them itself (afterok,
        --kill-on-invalid-dep); what it has not cancelled in time, the runner does."""
        behind = [self.jobs[s["name"]] for s in self.stages[k + 1:] if s["name"] in self.jobs]
        deadline = time.monotonic() + SLURM_CANCELS_WITHIN_S
        while any(not j.final for j in behind):
            if time.monotonic() > deadline:
                slurm_jobs.cancel([j.id for j in behind if not j.final])
                for job in behind:
                    if not job.final:
                        job.note(f"Slurm had not cancelled job {job.id} after "
                                 f"{SLURM_CANCELS_WITHIN_S:g} s: scancel")
                deadline = time.monotonic() + 60
            time.sleep(self.poll_s)
            found = slurm_jobs.states(j.id for j in behind if not j.final)
            for job in behind:
                if job.id in found:
                    job.state, job.reason = found[job.id]
        for job in behind:
            job.copy()
            job.stage["executor"]["queued"] = None
            job.note(f"Slurm job {job.id} ended {job.state} ({job.reason}): stage "
                     f"{self.stages[k]['name']} failed ({klass})")
        return behind

    def _fail(self, k: int, klass: str | None, reason: str | None,
              behind: list[_Job] = ()) -> tuple[bool, dict]:
        head = self.stages[k]
        head.update(status="cancelled" if klass == "cancelled" else "failed", ended=now_iso(),
                    failure_class=klass, reason=reason)
        head["duration_s"] = round(sum(a.get("seconds", 0) for a in head["attempts"]), 2)
        by_stage = {job.stage["name"]: job for job in behind}
        for stage in self.stages[k + 1:]:
            job = by_stage.get(stage["name"])
            stage.update(status="skipped", reason=f"stage {head['name']} failed ({klass})" + (
                f"; Slurm ended its job {job.id} {job.state} ({job.reason})" if job else ""))
        self.r.save()
        self.r._call_hook("after_stage", head)
        self.r.log(f"stage {head['name']} {head['status']}: {klass}: {reason}")
        return False, head

    def _cancel(self, head: dict) -> tuple[bool, dict]:
        """``invoke cancel``: every job of the chain cancelled, the run's stages with it."""
        slurm_jobs.cancel([j.id for j in self.jobs.values() if not j.final])
        deadline = time.monotonic() + 60
        while any(not j.final for j in self.jobs.values()) and time.monotonic() < deadline:
            time.sleep(TICK)
            found = slurm_jobs.states(j.id for j in self.jobs.values() if not j.final)
            for job in self.jobs.values():
                if job.id in found:
                    job.state, job.reason = found[job.id]
                elif not job.final:
                    job.state = "CANCELLED"  # squeue no longer lists it
        job = self.jobs.get(head["name"])
        if job is not None:
            job.copy()
            job.note(f"stopped (cancelled): Slurm job {job.id} ended {job.state}")
            if job.attempt is not None:
                self._ended(head, job, "cancelled", "cancelled by invoke cancel")
        for stage in self.stages:
            stage["executor"]["queued"] = None
        head.update(status="cancelled", ended=now_iso(), failure_class="cancelled",
                    reason="cancelled by invoke cancel")
        self.r.save()
        self.r._call_hook("after_stage", head)
        return False, head


__all__ = ["run_slurm_chain", "Chain"]
