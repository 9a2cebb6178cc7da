"""One stage attempt as a Slurm batch job, followed from its submission to its final state.

What ``executor = "slurm"`` runs (``plugins/slurm.py`` calls ``run_slurm_job``): the stage's
command goes into a job script (``<run>/slurm/<stage>.<n>.sbatch``), which ``sbatch``
submits chained after the run's previous Slurm job (``--dependency=afterok``,
``--kill-on-invalid-dep=yes``). While it runs, the job's output file is copied into the
stage's log (so ``logs -f`` and the log-based health watch read it as they read a local
process's output), the watch judges it every poll, and ``squeue`` is asked once per poll.
A cancel, or a bad verdict of the watch, is an ``scancel``. A job the cluster requeues
(preemption, ``scontrol requeue``) is followed under the same id. Its end is a
``ChildResult`` as a local process gives: the exit code, or the failure class of a job Slurm
ended (a time limit, a preemption, a lost node, out of memory, cancelled by someone else).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from remoteops.executors import CannotRun
from remoteops.server import slurm_jobs
from remoteops.server.pipeline import ChildResult

_LAST_OK: dict[str, str] = {}  # run dir -> the run's last job that completed (for afterok)
_CHECKED: set[str] = set()  # run dirs whose leftover jobs (a resumed run) were cancelled
TICK = 0.2


def run_slurm_job(launch: Any, log_path: Path, watch: Any, options: dict, cwd: Path, *,
                  cancelled: Callable[[], bool] = lambda: False,
                  on_change: Callable[[], None] = lambda: None,
                  on_job: Callable[..., None] = lambda job, **info: None,
                  **_: Any) -> ChildResult:
    """Submit ``launch`` as a batch job and follow it to its end; ``options`` are the
    merged ``[slurm]`` settings of the stage (``poll_seconds`` among them); the job runs
    in ``cwd`` (the project root)."""
    run_dir = log_path.parent.parent
    folder = run_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    n = 1 + len(list(folder.glob(f"{launch.stage}.*.sbatch")))
    script, output = folder / f"{launch.stage}.{n}.sbatch", folder / f"{launch.stage}.{n}.out"
    resume = launch.kind == "train" and "--resume" not in launch.argv
    name = f"remoteops-{run_dir.name.removeprefix('run_')}-{launch.stage}"
    then = [[launch.python, "-m", "remoteops.agent", step, "--stage", launch.stage,
             "--run-dir", str(run_dir)] for step in ("eval", "after-stage")
            ] if launch.kind == "train" else []  # on the job's node, not the login node
    script.write_text(slurm_jobs.batch_script(name, launch.argv, launch.env, cwd, output,
                                              options, resume, then))
    after = _LAST_OK.get(str(run_dir))
    if str(run_dir) not in _CHECKED:  # a resumed run: what its dead runner left must not run
        _CHECKED.add(str(run_dir))
        from remoteops.common.runs import load_state

        left = slurm_jobs.cancel_leftovers(slurm_jobs.recorded_jobs(load_state(run_dir)))
        if left:
            with open(log_path, "ab") as log:
                log.write(f"\n==> cancelled Slurm jobs {', '.join(left)} left by this run's "
                          f"previous runner\n".encode())
    try:
        job = slurm_jobs.submit(script, after)
    except slurm_jobs.SlurmError as exc:  # a partition Slurm does not know, no sbatch here
        raise CannotRun(f"stage {launch.stage}: {exc}") from None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n==> sbatch job {job}{' after ' + after if after else ''} "
                  f"({script.name}): {' '.join(launch.argv)}\n".encode())
        offset = log.tell()
    if watch is not None:
        watch.start(log_path, offset)
    on_job(job, after_training="in the job" if then else None)
    follower = _Follower(job, output, log_path, float(options.get("poll_seconds") or 1.0),
                         on_job)
    try:
        killed_for, message = follower.follow(watch, cancelled, on_change)
    except BaseException:  # the runner fails the stage; the job must not run on unwatched
        slurm_jobs.cancel([job])
        raise
    state, code = follower.final or slurm_jobs.final(job)
    follower.copy()
    if killed_for is None and state in slurm_jobs.FAILURE_CLASS and not cancelled():
        killed_for = slurm_jobs.FAILURE_CLASS[state]
        message = f"Slurm job {job} ended {state}" + (
            f" ({follower.reason})" if follower.reason not in ("", "None") else "")
    if state == "COMPLETED" and code == 0:
        _LAST_OK[str(run_dir)] = job
    verdict = watch.final(code) if watch is not None else None
    if killed_for or cancelled():
        follower.note(f"==> stopped ({killed_for or 'cancelled'}): Slurm job {job} ended "
                      f"{state}\n")
    return ChildResult(code, killed_for, message, verdict)


def copy_output(output: Path, pos: int, log_path: Path) -> int:
    """Append what a job's output file holds from ``pos`` on (at most 4 MiB) to the stage's
    log; the new position."""
    try:
        with open(output, "rb") as fh:
            fh.seek(pos)
            data = fh.read(1 << 22)
    except FileNotFoundError:
        return pos
    if data:
        with open(log_path, "ab") as log:
            log.write(data)
    return pos + len(data)


def last_ok(run_dir: Path) -> str | None:
    """The run's last Slurm job that completed (the next job goes ``afterok`` on it)."""
    return _LAST_OK.get(str(run_dir))


def remember_ok(run_dir: Path, job: str) -> None:
    _LAST_OK[str(run_dir)] = job


class _Follower:
    """One job: its output copied into the stage log, its state asked once per poll."""

    def __init__(self, job: str, output: Path, log_path: Path, poll_s: float,
                 on_job: Callable[..., None] = lambda job, **info: None):
        self.job, self.output, self.log_path, self.on_job = job, output, log_path, on_job
        self.poll_s = max(0.2, poll_s)
        self.pos = 0
        self.state, self.reason = "PENDING", ""
        self.queued: str | None = None
        self.started = False  # seen running since it was last pending (a requeue pends again)
        self.unseen = 0  # polls in a row squeue did not list the job
        self.final: tuple[str, int] | None = None

    def copy(self) -> None:
        """Append what the job wrote since the last copy to the stage's log."""
        self.pos = copy_output(self.output, self.pos, self.log_path)

    def note(self, line: str) -> None:
        with open(self.log_path, "ab") as log:
            log.write(line.encode())

    def poll(self) -> bool:
        """Ask squeue; True once the job is in a final state (a state the cluster may take
        back is looked at twice)."""
        was = self.state
        found = slurm_jobs.states([self.job]).get(self.job)
        self.unseen = 0 if found else self.unseen + 1
        if found:
            self.state, self.reason = found
            queued = (self.reason if self.reason not in ("", "None") else "waiting") \
                if self.state == "PENDING" else None
            if queued != self.queued:  # status shows why it waits
                self.queued = queued
                self.on_job(self.job, queued=queued)
        elif self.unseen >= 3:  # squeue forgot it (MinJobAge) or cannot answer: ask sacct
            try:
                self.final = slurm_jobs.final(self.job, tries=1)
            except slurm_jobs.SlurmError:
                return False
            self.state = self.final[0]
            return self.state in slurm_jobs.FINAL
        if self.state == "RUNNING" and not self.started:
            self.started = True
            self.t_start = time.monotonic()  # the health window counts from here, not queued
        if self.started and self.state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
            self.started = False  # it ran, and waits to run again
            self.note(f"==> Slurm job {self.job} was requeued ({self.state}, {self.reason}); "
                      f"it runs again under the same id\n")
        if self.state not in slurm_jobs.FINAL:
            return False
        if self.state in slurm_jobs.MAY_COME_BACK and was != self.state:
            return False  # look again next poll
        return True

    def follow(self, watch: Any, cancelled: Callable[[], bool],
               on_change: Callable[[], None]) -> tuple[str | None, str]:
        """Until the job is final: ``(None, "")``, or the watch's verdict that stopped it."""
        last = 0.0
        while True:
            time.sleep(TICK)
            self.copy()
            if cancelled():
                self.stop()
                return None, ""
            if time.monotonic() - last < self.poll_s:
                continue
            last = time.monotonic()
            if self.poll():
                return None, ""
            if watch is not None and self.state == "RUNNING":
                if getattr(self, "t_start", None) is not None:
                    watch.t0, self.t_start = self.t_start, None  # not the time it queued
                verdict = watch.poll()
                if watch.changed:
                    on_change()
                if verdict is not None:
                    self.stop()
                    return verdict.reason, verdict.message

    def stop(self, timeout: float = 60) -> None:
        """``scancel`` the job and wait until Slurm says it ended."""
        slurm_jobs.cancel([self.job])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = slurm_jobs.states([self.job]).get(self.job, ("", ""))[0]
            if state in slurm_jobs.FINAL or not state:
                break
            time.sleep(TICK)
        self.copy()


__all__ = ["run_slurm_job", "copy_output", "last_ok", "remember_ok"]
