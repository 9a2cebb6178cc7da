"""Slurm as the runner talks to it: a stage's batch script, ``sbatch``, one batched
``squeue`` per poll, a job's final state and exit code, ``scancel``, and what a final state
means for the failure policy.

Every call is a plain subprocess of Slurm's client tools (``sbatch``, ``squeue``, ``sacct``,
``scontrol``, ``scancel``) on the machine the runner runs on (a login node), for the
cluster that ``SLURM_CONF`` (or ``/etc/slurm``) names. Live state comes from ``squeue -t
all``, which also shows finished jobs for ``MinJobAge``; the final state and exit code from
``sacct`` where the cluster keeps accounting, else from ``scontrol show job``.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path
from typing import Iterable

# A job in one of these states will not run again unless someone requeues it.
FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"})
# How a job that did not end by its own exit code maps onto the failure classes (and so onto
# their policy, ``common.runs.POLICY``): a time limit, a preemption or a lost node resume
# from the latest checkpoint; Slurm's out-of-memory kill retries with a smaller batch.
FAILURE_CLASS = {"TIMEOUT": "timeout", "DEADLINE": "timeout", "PREEMPTED": "preempted",
                 "NODE_FAIL": "node_fail", "BOOT_FAIL": "node_fail", "OUT_OF_MEMORY": "oom",
                 "CANCELLED": "cancelled", "REVOKED": "cancelled"}
# The cluster may requeue such a job itself (PreemptMode=REQUEUE, a node coming back): a
# second look confirms the state is final before the runner acts on it.
MAY_COME_BACK = frozenset({"PREEMPTED", "NODE_FAIL"})
# [slurm] key -> sbatch option
OPTION_FLAGS = {"partition": "--partition", "account": "--account", "gres": "--gres",
                "time": "--time", "cpus": "--cpus-per-task", "mem": "--mem"}


class SlurmError(RuntimeError):
    """A Slurm client tool is missing or refused (one line)."""


def _call(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} is not installed on this machine: executor \"slurm\" runs "
                         "the pipeline on a Slurm login node (with sbatch, squeue and scancel); "
                         "point the host at one, or use executor = \"process\".") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{args[0]} did not answer in {timeout:g} s (is slurmctld up?)") from None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def batch_script(name: str, argv: list[str], env: dict[str, str], cwd: Path, output: Path,
                 options: dict, resume_on_requeue: bool, then: list[list[str]] = ()) -> str:
    """The job script of one stage attempt: ``#SBATCH`` lines from ``[slurm]`` and
    ``[stages.X.slurm]``, the stage's environment, then its command, and when it succeeds
    the ``then`` commands (a training stage's evaluation and after-stage plugins, on the
    job's node; the job's exit code stays the command's). A job the cluster requeues
    (preemption, ``scontrol requeue``) runs the script again: a training stage then adds
    ``--resume latest`` (``SLURM_RESTART_COUNT`` > 0)."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={output}",
             "#SBATCH --open-mode=append", "#SBATCH --requeue", f"#SBATCH --chdir={cwd}"]
    for key, flag in OPTION_FLAGS.items():
        if options.get(key):
            lines.append(f"#SBATCH {flag}={options[key]}")
    lines += [extra if extra.startswith("#SBATCH") else f"#SBATCH {extra}"
              for extra in options.get("extra") or []]
    lines += ["", "# written by remoteops (executor \"slurm\"): one attempt of one stage"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    command = shlex.join(argv)
    if resume_on_requeue:
        lines += ['if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then',
                  '  echo "==> job requeued (restart $SLURM_RESTART_COUNT): resuming from the '
                  'latest checkpoint"', "  set -- --resume latest", "fi"]
        command += ' "$@"'
    if not then:
        return "\n".join(lines + [f"exec {command}"]) + "\n"
    lines += [command, "rc=$?", 'if [ "$rc" -eq 0 ]; then',
              '  echo "==> evaluation and after-stage plugins in job $SLURM_JOB_ID"',
              "  " + " && ".join(shlex.join(step) for step in then), "fi", 'exit "$rc"']
    return "\n".join(lines) + "\n"


def submit(script: Path, after: str | None = None) -> str:
    """``sbatch`` the script; its job id. ``after``: the job it must follow
    (``--dependency=afterok``; with ``--kill-on-invalid-dep=yes`` it is cancelled, never
    left pending, when that job did not succeed)."""
    args = ["sbatch", "--parsable"]
    if after:
        args += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    res = _call(args + [str(script)])
    if res.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {_first_line(res.stderr or res.stdout)}")
    return res.stdout.strip().split(";")[0]


def states(ids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` from one ``squeue`` call for all the jobs; a job squeue
    no longer knows is missing."""
    ids = list(ids)
    if not ids:
        return {}
    res = _call(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"], 30)
    found: dict[str, tuple[str, str]] = {}
    for line in res.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            found[parts[0]] = (parts[1], parts[2])
    return found


def final(job: str, tries: int = 5) -> tuple[str, int]:
    """``(state, exit code)`` of a finished job: ``sacct`` where the cluster keeps accounting
    (asked again while it has no row yet), else ``scontrol show job``. A job killed by a
    signal has code 128 + the signal."""
    for attempt in range(tries):
        res = _call(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State,ExitCode"], 30)
        text = res.stdout + res.stderr
        if res.returncode != 0 or "disabled" in text:
            break  # no accounting here
        rows = [r.split("|") for r in res.stdout.splitlines() if r.count("|") == 1]
        if rows and rows[-1][0].split()[0] not in ("PENDING", "RUNNING", "REQUEUED"):
            return rows[-1][0].split()[0], _exit_code(rows[-1][1])
        time.sleep(0.3 * (attempt + 1))
    res = _call(["scontrol", "-o", "show", "job", job], 30)
    fields = dict(word.split("=", 1) for word in res.stdout.split() if "=" in word)
    if res.returncode != 0 or "JobState" not in fields:
        raise SlurmError(f"Slurm no longer knows job {job} (neither sacct nor scontrol has it)")
    return fields["JobState"], _exit_code(fields.get("ExitCode", "0:0"))


def _exit_code(text: str) -> int:
    code, _, sig = text.partition(":")
    try:
        code_n, sig_n = int(code), int(sig or 0)
    except ValueError:
        return 1
    return code_n if code_n or not sig_n else 128 + sig_n


def cancel(ids: Iterable[str]) -> None:
    """``scancel`` the jobs (one call); a job already finished is left as it is."""
    ids = list(ids)
    if ids:
        _call(["scancel", *ids], 30)


def recorded_jobs(state: dict) -> list[str]:
    """Every Slurm job a run's ``state.json`` names (its attempts and its chains)."""
    ids = [a["job"] for s in state.get("stages", []) for a in s.get("attempts", [])
           if a.get("job")]
    ids += [j["job"] for c in state.get("slurm_chains", []) for j in c.get("jobs", [])]
    return list(dict.fromkeys(ids))


def cancel_leftovers(ids: Iterable[str], timeout: float = 60) -> list[str]:
    """Cancel those of ``ids`` that are still queued or running (a resumed run's jobs from
    the runner that died) and wait until Slurm says they ended; the ones cancelled."""
    ids = list(ids)
    found = states(ids)
    live = [job for job in ids if job in found and found[job][0] not in FINAL]
    if not live:
        return []
    cancel(live)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
            state not in FINAL for state, _ in states(live).values()):
        time.sleep(0.2)
    return live


__all__ = ["FINAL", "FAILURE_CLASS", "MAY_COME_BACK", "SlurmError", "batch_script", "submit",
           "states", "final", "cancel", "recorded_jobs", "cancel_leftovers"]
