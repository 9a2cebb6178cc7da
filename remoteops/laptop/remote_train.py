"""``remote-train`` on the laptop: deploy if needed, start the detached pipeline, follow it,
collect the results. The server side goes on whatever happens to this process.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from remoteops.laptop.collect import collect_run, fetch_listing, in_place, listing_args, write_areas
from remoteops.common.config import Settings
from remoteops.common.errors import ConnectError, RemoteCommandError, RemoteOpsError
from remoteops.common.runs import plan_stages
from remoteops.common.target import Target

SERVER_DONE = ("done", "failed", "cancelled", "dead")


@dataclass
class TrainRequest:
    host: str | None
    stages: list[str] | None
    skip_sample: bool
    resume: str | bool | None
    detach: bool
    deploy: bool


def describe_plan(settings: Settings, target: Target, req: TrainRequest) -> list[str]:
    """What will run: host, stages (with datasets and presets), model."""
    lines = [f"remote-train on {target.describe()} ({target.project_root})"]
    if req.resume:
        run = req.resume if isinstance(req.resume, str) else "the latest run"
        lines.append(f"  resume {run} from its first unfinished stage")
        return lines
    lines.append(f"  model: {settings['train.base_model']}{_model_note(settings, target)}; "
                 f"gpu gate: {settings['gpu_gate']}")
    for stage in plan_stages(settings, req.stages, req.skip_sample or settings["skip_sample"]):
        table = settings["stages"].get(stage["name"], {})
        detail = {"precheck": "check the server", "collect": "bring results back"}.get(
            stage["kind"], "")
        if stage["kind"] == "train":
            data = table.get("dataset") or (  # a live set: what arrives while it trains
                f"live data {table.get('dataset_live')} (from {table.get('min_samples', 1)} "
                "samples)")
            detail = (f"train on {data} (preset "
                      f"{table.get('preset') or settings['train.preset']})")
        elif stage["kind"] == "command":
            detail = f"run: {table.get('command')}"
        if table.get("executor", "process") != "process":
            per_node = table.get("nproc_per_node")
            detail += (f" under {table['executor']}" + (f", {per_node} processes per machine"
                       if per_node else ", a process per GPU" if table["executor"] == "torchrun"
                       else ""))
        state = " [skipped: --skip-sample]" if stage["status"] == "skipped" else ""
        lines.append(f"  - {stage['name']}: {detail}{state}")
    return lines


def _planned(settings: Settings, req: TrainRequest) -> list[str]:
    return [s["name"] for s in plan_stages(settings, req.stages, req.skip_sample or
                                           settings["skip_sample"])
            if s["status"] == "pending" and s["kind"] in ("train", "command")]


def check_layout_here(settings: Settings, req: TrainRequest, hosts: list[str]) -> None:
    """Refuse (one line) a stage that spans more or fewer machines (``nnodes``) than
    ``hosts`` names, before anything is shown, deployed or started (``laptop/multi_node``)."""
    from remoteops.common.multi_node import check_layout

    if not req.resume:
        check_layout(settings, _planned(settings, req), hosts)


def check_executors_here(settings: Settings, req: TrainRequest) -> None:
    """Refuse an unknown executor (or a bad option) of a planned stage before anything is
    deployed or started: the project's plugins are here as they will be on the server."""
    if req.resume:
        return
    from remoteops.plugins import check_executors, get_plugin_manager

    stages = _planned(settings, req)
    check_executors(get_plugin_manager(settings.project_dir, settings["plugins_dir"]), settings,
                    stages)


def _model_note(settings: Settings, target: Target) -> str:
    from remoteops.laptop.fetch_model import laptop_copy, laptop_ref

    if in_place(target, settings.project_dir):
        return ""
    try:
        ref = laptop_ref(settings)
    except RemoteOpsError:
        return ""
    if ref.kind == "local":
        return (" (on this laptop: uploaded if the server lacks it)"
                if laptop_copy(settings, ref) else "")
    return " (the server downloads it if its cache lacks it)"


def refuse_if_live(target: Target) -> None:
    """Refuse (one line) before deploying while a run is live on the target's root: its next
    stage would read the new files. The server checks again under its locks."""
    from remoteops.common.target import AgentMissing

    try:
        live = target.run_agent("pipeline-live", "--root", target.project_root).get("live")
    except AgentMissing:
        return  # no agent there yet: nothing can be running
    except RemoteCommandError as exc:
        if "No such command" in str(exc):
            return  # an older agent: its deploy-apply is the only check
        raise
    if live:
        raise RemoteOpsError(
            f"pipeline run {live['run_id']} is live on {target.describe()} (runner pid "
            f"{live['pid']}, since {live['since']}); nothing was deployed or started. Follow it "
            f"with 'invoke status {live['run_id']}', or stop it with 'invoke cancel --run "
            f"{live['run_id']}'.")


def base_model_to_server(settings: Settings, target: Target, req: TrainRequest,
                         progress=None, say=None) -> dict | None:
    """A base-model folder on this laptop that the server lacks goes up before the run starts
    (``fetch-model --from-laptop``'s path): the demo model lives in ``outputs/``, which a
    deploy never ships. Hub ids are the server's to download (its first training stage)."""
    if req.resume:
        return None
    stages = plan_stages(settings, req.stages, req.skip_sample or settings["skip_sample"])
    if not any(s["kind"] == "train" and s["status"] != "skipped" for s in stages):
        return None
    from remoteops.laptop.fetch_model import ensure_on_server

    return ensure_on_server(settings, target, progress, say)


def start(settings: Settings, target: Target, req: TrainRequest,
          overrides: dict | None = None, node: str | None = None) -> dict:
    """``overrides``: the host's ``[hosts.NAME.overrides]`` (dotted keys), for its run alone;
    ``node``: its part of a run spanning several hosts (``laptop/multi_node``), as JSON."""
    args = ["pipeline-start", "--root", target.project_root, "--gpu-gate", settings["gpu_gate"],
            "--host-label", req.host or target.describe()]
    if node:
        args += ["--node", node]
    if overrides:
        args += ["--overrides", json.dumps(overrides, sort_keys=True)]
    if req.stages:
        args += ["--stages", ",".join(req.stages)]
    if req.skip_sample or settings["skip_sample"]:
        args += ["--skip-sample"]
    if req.resume:
        run = req.resume if isinstance(req.resume, str) else _latest_run(target)
        args += ["--resume", run]
    return target.run_agent(*args, timeout=120)


def _latest_run(target: Target) -> str:
    runs = target.run_agent("pipeline-runs", "--root", target.project_root)["runs"]
    if not runs:
        raise RemoteOpsError(f"no run to resume on {target.describe()}; start one with "
                             "'invoke remote-train'.")
    return runs[-1]["run_id"]


def status(target: Target, run_id: str | None = None, lines: int = 8) -> dict:
    args = ["pipeline-status", "--root", target.project_root, "--lines", str(lines)]
    return target.run_agent(*(args + (["--run", run_id] if run_id else [])))


def follow(open_target: Callable[[], Target], target: Target, run_id: str,
           show: Callable[[dict | None, str], None], poll: float = 1.0) -> tuple[dict, Target]:
    """Poll the run until the server side ends; reconnect by itself after a dropped link."""
    failures = 0
    while True:
        try:
            data = status(target, run_id)
            failures = 0
        except (ConnectError, RemoteCommandError, OSError, EOFError) as exc:
            if " is damaged: " in str(exc):
                raise  # the run's state.json is unreadable: reconnecting will not mend it
            failures += 1
            delay = min(30.0, 2.0 ** min(failures, 5))
            show(None, f"connection lost ({exc}); reconnecting in {delay:.0f}s "
                       f"(the run goes on on the server)")
            time.sleep(delay)
            target.close()
            try:
                target = open_target()
            except RemoteOpsError:
                pass
            continue
        show(data, "")
        finished = data["status"] == "dead" or data["status"] in SERVER_DONE and (
            data.get("runner", {}).get("exited") or not data["runner_health"].get("alive"))
        if finished:
            return data, target
        time.sleep(poll)


def mark_args(target: Target, run_id: str, ok: bool, reason: str = "") -> list[str]:
    args = ["pipeline-mark", "--root", target.project_root, "--run", run_id, "--stage",
            "collect", "--status", "done" if ok else "failed"]
    return args + (["--reason", reason] if reason else [])


def mark_collected(target: Target, run_id: str, ok: bool, reason: str = "") -> dict:
    return target.run_agent(*mark_args(target, run_id, ok, reason))


def collect_and_report(settings: Settings, target: Target, run_id: str | None,
                       progress_factory=None, since: float | None = None,
                       into: list[str] | None = None) -> dict:
    """Fetch results, mark collect done on the server (which rewrites its reports), and fetch
    the rewritten reports, so the laptop's copy equals the server's. ``into``: the folder
    results go to instead of ``outputs/`` (``["outputs", host]`` for several hosts)."""
    areas = write_areas(settings)  # the laptop's own config says where collect may write
    listed = fetch_listing(target, listing_args(target, run_id))  # files and state, one call
    node = (listed[0].get("state") or {}).get("node")
    if node and node["rank"] > 0 and into is None:  # not node 0's copy of a spanning run
        from remoteops.laptop.host_group import folder_name

        into = ["outputs", folder_name(node["hosts"][node["rank"]])]
    result = collect_run(target, settings.project_dir, run_id, since=since,
                         progress_factory=progress_factory, areas=areas, listed=listed,
                         into=into)
    run_id = result.run_id
    state = listed[0].get("state") or status(target, run_id, lines=0)  # (an older agent)
    collect_stage = next((s for s in state["stages"] if s["name"] == "collect"), None)
    if collect_stage and collect_stage["status"] != "done" and state["status"] not in (
            "failed", "running", "dead", "cancelled") and not (node and node["rank"] > 0):
        # one call marks collect done, rewrites the reports and lists them again
        marked = fetch_listing(target, mark_args(target, run_id, True) + ["--list-files"])
        result.merge(collect_run(target, settings.project_dir, run_id, areas=areas,
                                 listed=marked, into=into))
        state = marked[0]["state"]
    summary = local_run_dir(settings, run_id, into) / "TRAINING_SUMMARY.md"
    closure = summary.with_name("final_closure_report.md")
    return {**result.to_dict(), "status": state["status"],
            "summary": str(summary) if summary.is_file() else None,
            "closure_report": str(closure) if closure.is_file() else None}


def local_run_dir(settings: Settings, run_id: str, into: list[str] | None = None) -> Path:
    return settings.project_dir.joinpath(*(into or ["outputs"]), "training_sync", run_id)


__all__ = ["TrainRequest", "describe_plan", "base_model_to_server", "refuse_if_live", "start", "status", "follow", "collect_and_report",
           "in_place", "SERVER_DONE"]
