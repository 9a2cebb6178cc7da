"""The stage pipeline on the server: a detached, resumable state machine.

A run lives in ``outputs/training_sync/run_<UTC stamp>/``: ``state.json``
(atomically rewritten: every stage's status, times, attempts, failure class
and reason, outputs), ``runner.heartbeat``, ``logs/<stage>.log`` and what the
trainer writes (metrics, signals, checkpoints, eval reports). One runner per
project root at a time (``.remoteops/pipeline.lock``). Each stage runs as a
child process in the runner's process group, so ``cancel`` stops them all and
a runner killed with SIGKILL takes its children with it (parent-death signal).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from remoteops.config import Settings
from remoteops.errors import RemoteOpsError
from remoteops.locks import pid_alive
from remoteops.trainer.rundir import RUNS_DIR, utc_stamp, write_atomic

DEFAULT_STAGES = ["precheck", "sample", "style", "writing", "all", "collect"]
KINDS = ("precheck", "train", "command", "collect")
# Failure class -> what the runner does about it.
POLICY = {"config": "fail", "data": "fail", "nan": "stop", "divergence": "stop",
          "lr_zero": "stop", "stagnation": "stop", "oom": "smaller_batch", "cuda": "resume", "process_died": "resume",
          "stale": "resume", "traceback": "fail", "cancelled": "stop", "eval": "fail"}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def stage_kind(name: str, table: dict) -> str:
    kind = table.get("kind")
    if kind is None:
        kind = name if name in ("precheck", "collect") else (
            "command" if table.get("command") else "train")
    if kind not in KINDS:
        raise RemoteOpsError(f"stages.{name}.kind is {kind!r}; use one of {', '.join(KINDS)}.")
    return kind


def plan_stages(settings: Settings, only: list[str] | None, skip_sample: bool) -> list[dict]:
    """The stage list of a new run, each a fresh state entry."""
    names = list(settings["pipeline.stages"])
    tables = settings["stages"]
    if only:
        unknown = [n for n in only if n not in names and n not in tables]
        if unknown:
            raise RemoteOpsError(f"unknown stage {unknown[0]!r}; stages are "
                                 f"{', '.join(names)} (pipeline.stages in remoteops.toml).")
        names = [n for n in names if n in only] + [n for n in only if n not in names]
    out = []
    for name in names:
        table = tables.get(name, {})
        kind = stage_kind(name, table)
        if kind == "train" and not table.get("dataset"):
            raise RemoteOpsError(f"stage {name!r} has no dataset; add [stages.{name}] dataset = "
                                 "\"data/....jsonl\" to remoteops.toml, or a command.")
        entry = {"name": name, "kind": kind, "status": "pending", "attempt": 0, "attempts": [],
                 "started": None, "ended": None, "duration_s": None, "failure_class": None,
                 "reason": None, "outputs": {}, "warnings": []}
        if skip_sample and name == "sample":
            entry.update(status="skipped", reason="--skip-sample")
        out.append(entry)
    return out


# -- state files -------------------------------------------------------------------------

def runs_root(project_root: Path) -> Path:
    return project_root / RUNS_DIR


def load_state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RemoteOpsError(f"no pipeline run in {run_dir}; 'invoke runs' lists them.") from None


def save_state(run_dir: Path, state: dict) -> None:
    state["updated"] = now_iso()
    write_atomic(run_dir / "state.json", json.dumps(state, indent=1, default=str) + "\n")


def find_run(project_root: Path, run_id: str | None) -> Path:
    base = runs_root(project_root)
    if run_id:
        path = base / run_id if not run_id.startswith("/") else Path(run_id)
        if not (path / "state.json").is_file():
            raise RemoteOpsError(f"no run {run_id!r} under {base}; 'invoke runs' lists them.")
        return path
    runs = list_runs(project_root)
    if not runs:
        raise RemoteOpsError(f"no pipeline runs under {base} yet; start one with "
                             "'invoke remote-train'.")
    return Path(runs[-1]["run_dir"])


def list_runs(project_root: Path) -> list[dict]:
    base = runs_root(project_root)
    out = []
    for path in sorted(base.glob("run_*/state.json")) if base.is_dir() else []:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        out.append({"run_id": state["run_id"], "run_dir": str(path.parent),
                    "created": state["created"], "status": effective_status(path.parent, state),
                    "stages": {s["name"]: s["status"] for s in state["stages"]},
                    "duration_s": _run_duration(state), "best": _best_metrics(path.parent)})
    return out


def _run_duration(state: dict) -> float | None:
    total = [s["duration_s"] for s in state["stages"] if s.get("duration_s")]
    return round(sum(total), 1) if total else None


def _best_metrics(run_dir: Path) -> dict:
    try:
        stages = json.loads((run_dir / "summary.json").read_text())["stages"]
    except (FileNotFoundError, ValueError, KeyError):
        return {}
    return {name: (entry.get("best") or {}).get("eval_loss") for name, entry in stages.items()}


# -- liveness ------------------------------------------------------------------------------

def runner_health(run_dir: Path, state: dict) -> dict:
    try:
        beat = json.loads((run_dir / "runner.heartbeat").read_text())
        age = round(time.time() - beat["time"], 1)
    except (FileNotFoundError, ValueError, KeyError):
        beat, age = {}, None
    pid = state.get("runner", {}).get("pid")
    alive = pid_alive(pid) if state.get("runner", {}).get("host") == socket.gethostname() else None
    return {"pid": pid, "alive": alive, "heartbeat_age_s": age,
            "interval_s": state.get("options", {}).get("heartbeat_seconds")}


def effective_status(run_dir: Path, state: dict) -> str:
    """The recorded status, except that a running run whose runner is gone is 'dead'."""
    status = state["status"]
    if status == "running":
        health = runner_health(run_dir, state)
        interval = health["interval_s"] or 2.0
        stale = health["heartbeat_age_s"] is None or health["heartbeat_age_s"] > 2 * interval
        if health["alive"] is False or (health["alive"] is None and stale):
            return "dead"
    return status


# -- child processes -------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child: get SIGTERM when the runner dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class ChildResult:
    code: int
    killed_for: str | None = None  # a log-watch verdict that made us stop it
    message: str = ""


def spawn_detached(args: list[str], log_path: Path, cwd: Path) -> subprocess.Popen:
    """Start ``args`` in a new session with no terminal, output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Without the SSH session's variables: bash sees SSH_CLIENT and sources ~/.bashrc for
    # every `bash -c` a stage runs (a conda or pyenv init costs seconds each time).
    env = {k: v for k, v in os.environ.items()
           if k not in ("SSH_CLIENT", "SSH2_CLIENT", "SSH_CONNECTION", "SSH_TTY")}
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True, env=env)


def agent_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "remoteops.agent", *args]


__all__ = ["DEFAULT_STAGES", "POLICY", "plan_stages", "load_state", "save_state", "find_run",
           "list_runs", "effective_status", "runner_health", "spawn_detached", "agent_args",
           "ChildResult", "now_iso", "utc_stamp", "pid_alive"]
