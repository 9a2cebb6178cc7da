"""Runs of the stage pipeline: planning, state, the run directory, liveness (both sides).

The laptop plans stages and reads stage kinds and outputs from here; the server's runner
(``remoteops.server.runner``) and agent start, drive and report runs with it; starting a
detached runner is ``remoteops.server.pipeline``. The pipeline is a detached, resumable
state machine on the server.

A run lives in ``outputs/training_sync/run_<UTC stamp>/``: ``state.json``
(atomically rewritten: every stage's status, times, attempts, failure class
and reason, outputs), ``runner.heartbeat``, ``logs/<stage>.log`` and what the
trainer writes (metrics, signals, checkpoints, eval reports). One runner per
project root at a time (``.remoteops/pipeline.lock``, an OS file lock that
pipeline-start hands to the runner it spawns, so it is never free in between).
While it is held, deploys and rollbacks of that root are refused
(``live_run``). A stage's whole process tree is stopped on failure or cancel
(``remoteops.server.proctree``); a runner killed with SIGKILL takes its direct child
with it (parent-death signal).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from remoteops.common.clock import now_iso
from remoteops.common.files import write_atomic_json
from remoteops.common.config import Settings
from remoteops.common.errors import RemoteOpsError
from remoteops.common.locks import FileLock, identity_alive, pid_alive, process_identity
from remoteops.common.paths import UnsafePath, safe_relpath
from remoteops.common.defaults import KINDS  # noqa: F401 - the stage kinds

RUNS_DIR = Path("outputs") / "training_sync"  # a project's runs, relative to its root
# Failure class -> what the runner does about it.
POLICY = {"config": "fail", "data": "fail", "nan": "stop", "divergence": "stop",
          "lr_zero": "stop", "stagnation": "stop", "oom": "smaller_batch", "cuda": "resume", "process_died": "resume",
          "stale": "resume", "traceback": "fail", "cancelled": "stop", "eval": "fail",
          "internal": "fail",
          # a Slurm job ended by its time limit, a preemption or a lost node (server/slurm_jobs)
          "timeout": "resume", "preempted": "resume", "node_fail": "resume",
          # a node of a run spanning several hosts lost (common/multi_node): never retried alone
          "node_lost": "fail"}
# Floors for intervals read from settings: 0 or a negative value must not make a loop spin.
MIN_HEARTBEAT_S = 0.2
SETTINGS_FILE = "settings.json"  # in a run directory: the settings the run started with


def stop_grace(settings) -> float:
    """Seconds a stopped stage's processes get between SIGTERM and SIGKILL."""
    try:
        return min(600.0, max(0.0, float(settings.get("pipeline.stop_grace_seconds", 10.0))))
    except (TypeError, ValueError):
        return 10.0


def stage_kind(name: str, table: dict) -> str:
    kind = table.get("kind")
    if kind is None:
        kind = name if name in ("precheck", "collect") else (
            "command" if table.get("command") else "train")
    if kind not in KINDS:
        raise RemoteOpsError(f"stages.{name}.kind is {kind!r}; use one of {', '.join(KINDS)}.")
    return kind


def stage_outputs(name: str, table: dict) -> list[str]:
    """What a command stage produces (``[stages.X] outputs``), project-relative, for collect."""
    outs = table.get("outputs", [f"outputs/adapter/adapter_{name}"])
    if isinstance(outs, str):
        outs = [outs]
    if not isinstance(outs, list) or not all(isinstance(p, str) and p.strip() for p in outs):
        raise RemoteOpsError(f"stages.{name}.outputs must be a list of paths inside the project, "
                             f"e.g. outputs = [\"outputs/adapter/adapter_{name}\"].")
    clean = []
    for path in outs:
        try:
            rel = None if path.startswith("~") else safe_relpath(path, f"stages.{name}.outputs")
        except UnsafePath:
            rel = None
        if rel is None:
            raise RemoteOpsError(f"stages.{name}.outputs: {path!r} leaves the project folder; "
                                 "name paths relative to the project root.")
        clean.append(rel)
    return clean


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
        if kind == "train" and not (table.get("dataset") or table.get("dataset_live")):
            raise RemoteOpsError(f"stage {name!r} has no dataset; add [stages.{name}] dataset = "
                                 "\"data/....jsonl\" (or dataset_live = \"data/live\") to "
                                 "remoteops.toml, or a command.")
        if kind == "command":
            stage_outputs(name, table)  # a bad value is refused before anything starts
        entry = {"name": name, "kind": kind, "status": "pending", "attempt": 0, "attempts": [],
                 "started": None, "ended": None, "duration_s": None, "failure_class": None,
                 "reason": None, "outputs": {}, "warnings": []}
        if skip_sample and name == "sample":
            entry.update(status="skipped", reason="--skip-sample")
        out.append(entry)
    return out


# -- state files -------------------------------------------------------------------------

def save_run_settings(run_dir: Path, settings: Settings) -> None:
    """Fix a run's settings when it starts (or resumes): every process of the run (runner,
    trainer, eval, after-stage plugins) reads these instead of loading the files again."""
    write_atomic_json(Path(run_dir) / SETTINGS_FILE, settings.snapshot(), indent=1, default=str)


def run_settings(run_dir: Path, project_root: Path | None = None) -> Settings:
    """The settings the run started with; a run from before snapshots loads the files."""
    from remoteops.common.config import load_settings

    try:
        data = json.loads((Path(run_dir) / SETTINGS_FILE).read_text(encoding="utf-8"))
        return Settings.from_snapshot(data)
    except FileNotFoundError:
        return load_settings(project_root)
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteOpsError(f"{Path(run_dir) / SETTINGS_FILE} is damaged ({exc}); start a "
                             "new run.") from None


def runs_root(project_root: Path) -> Path:
    return project_root / RUNS_DIR


class DamagedRun(RemoteOpsError):
    """A run whose state.json cannot be read (truncated, not JSON)."""


def read_state(run_dir: Path) -> dict:
    """The run's state; raises ``DamagedRun`` (one line) when state.json is unreadable."""
    path = run_dir / "state.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RemoteOpsError(f"no pipeline run in {run_dir}; 'invoke runs' lists them.") from None
    try:
        state = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        why = "empty" if not raw.strip() else f"not valid JSON ({exc})"
        raise DamagedRun(f"run {run_dir.name} is damaged: its state.json ({len(raw)} bytes) is "
                         f"{why}; its logs are in {run_dir / 'logs'}. Start a new run with "
                         "'invoke remote-train'.") from None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), list):
        raise DamagedRun(f"run {run_dir.name} is damaged: its state.json has no stage list; "
                         "start a new run with 'invoke remote-train'.")
    state.setdefault("run_id", run_dir.name)
    return state


load_state = read_state


def save_state(run_dir: Path, state: dict) -> None:
    """Atomically and durably: temp file, fsync, rename, fsync of the folder."""
    state["updated"] = now_iso()
    write_atomic_json(run_dir / "state.json", state, indent=1, default=str)


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
    """Every run, oldest first; a run whose state is unreadable is listed as damaged."""
    base = runs_root(project_root)
    out = []
    for path in sorted(base.glob("run_*/state.json")) if base.is_dir() else []:
        try:
            state = read_state(path.parent)
        except DamagedRun as exc:
            out.append({"run_id": path.parent.name, "run_dir": str(path.parent),
                        "created": "?", "status": "damaged", "reason": str(exc), "stages": {},
                        "duration_s": None, "best": {}})
            continue
        out.append({"run_id": state["run_id"], "run_dir": str(path.parent),
                    "created": state.get("created", "?"),
                    "status": effective_status(path.parent, state),
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

def runner_alive(state: dict) -> bool | None:
    """Whether the run's runner process still runs (None: it runs on another host)."""
    runner = state.get("runner") or {}
    if not runner.get("pid"):
        return False
    ident = runner.get("identity") or {"host": runner.get("host"), "pid": runner.get("pid")}
    return identity_alive(ident)


def runner_health(run_dir: Path, state: dict) -> dict:
    try:
        beat = json.loads((run_dir / "runner.heartbeat").read_text())
        age = round(time.time() - beat["time"], 1)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        beat, age = {}, None
    return {"pid": (state.get("runner") or {}).get("pid"), "alive": runner_alive(state),
            "heartbeat_age_s": age,
            "interval_s": state.get("options", {}).get("heartbeat_seconds")}


def effective_status(run_dir: Path, state: dict) -> str:
    """The recorded status, except that a running run whose runner is gone is 'dead'."""
    status = state["status"]
    if status == "running":
        health = runner_health(run_dir, state)
        interval = max(MIN_HEARTBEAT_S, float(health["interval_s"] or 2.0))
        stale = health["heartbeat_age_s"] is None or health["heartbeat_age_s"] > 2 * interval
        if health["alive"] is False or (health["alive"] is None and stale):
            return "dead"
    return status


# -- the project root while a run is live ------------------------------------------------------

def pipeline_lock(project_root: Path, holder: str = "", fd: int | None = None) -> FileLock:
    return FileLock(Path(project_root) / ".remoteops" / "pipeline.lock", holder, fd)


def live_run(project_root: str | Path) -> dict | None:
    """The run whose runner holds this root's pipeline lock now, or None."""
    held = pipeline_lock(Path(os.path.expanduser(str(project_root)))).held_by()
    if held is None:
        return None
    holder = str(held.get("holder") or "")
    run_id = held.get("run_id") or (holder.split(" ", 1)[1] if holder.startswith("pipeline ")
                                    else holder or "unknown")
    return {"run_id": run_id, "pid": held.get("pid"), "host": held.get("host"),
            "since": held.get("time"), "holder": holder}


def refuse_if_live(project_root: str | Path, action: str) -> None:
    """Raise (one line) when a pipeline run is live on this root; changes nothing."""
    live = live_run(project_root)
    if live is not None:
        raise RemoteOpsError(
            f"pipeline run {live['run_id']} is live on this root (runner pid {live['pid']}, "
            f"since {live['since']}): {action} now would change its files under it; wait for "
            f"it to end or stop it with 'invoke cancel --run {live['run_id']}'. Nothing was "
            "changed.")


__all__ = ["POLICY", "plan_stages", "load_state", "read_state", "save_state",
           "find_run", "list_runs", "effective_status", "runner_health", "runner_alive",
           "pid_alive", "live_run", "refuse_if_live", "pipeline_lock", "DamagedRun",
           "process_identity"]


def executor_label(executor: dict | None) -> str:
    """How a stage's executor (as ``state.json`` records it) reads in a table:
    ``process``, ``torchrun 2x1`` (processes per node x nodes), ``slurm job 42`` (its last; ``, queued (Priority)`` while it waits)."""
    if not executor:
        return "-"
    if executor.get("name") == "torchrun":
        from remoteops.common.multi_node import part

        return (f"torchrun {executor.get('nproc_per_node', '?')}x{executor.get('nnodes', 1)}"
                + part(executor))
    if executor.get("name") == "slurm" and executor.get("job"):
        queued = executor.get("queued")
        return f"slurm job {executor['job']}" + (f", queued ({queued})" if queued else "")
    return str(executor.get("name") or "-")
