"""Agent commands of the pipeline: start (detached), run, status, logs, cancel, runs, files.

The laptop calls each with ``--json`` in one SSH command and reads the JSON
between markers.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import time
from pathlib import Path

import click

from remoteops.server.agent.deploy_commands import emit, json_option, root_option


def _root(root: str) -> Path:
    return Path(os.path.expanduser(root)).resolve()


@click.command("pipeline-start")
@root_option
@click.option("--stages", default=None, help="Comma-separated stages to run (default: all).")
@click.option("--skip-sample", is_flag=True, help="Skip the sample (smoke-test) stage.")
@click.option("--gpu-gate", default=None, help="strict, warn or off for the precheck stage.")
@click.option("--resume", "resume", default=None, help="Continue this run (a run id).")
@click.option("--host-label", default="", help="How the laptop names this server (reports).")
@click.option("--overrides", default=None, help="This host's settings overrides, a JSON object "
              "of dotted keys ([hosts.NAME.overrides]), applied like flags.")
@click.option("--node", default=None, help="This host's part of a run spanning several "
              "machines, a JSON object (remote-train sends it; server/node_part).")
@json_option
def pipeline_start(root, stages, skip_sample, gpu_gate, resume, host_label, overrides, node,
                   as_json):
    """Start the pipeline detached (new session, no terminal) and return at once."""
    from remoteops.common.config import load_settings
    from remoteops.common.errors import RemoteOpsError
    from remoteops.common.clock import now_iso
    from remoteops.common.runs import (effective_status, load_state, pipeline_lock,
                                       plan_stages, process_identity, save_run_settings,
                                       save_state)
    from remoteops.server.node_part import choose_run_dir
    from remoteops.server.pipeline import agent_args, finish_pending_apply, spawn_detached

    project = _root(root)
    extra = json.loads(overrides) if overrides else {}
    settings = load_settings(project, flags={**extra, "gpu_gate": gpu_gate or extra.get(
        "gpu_gate")})
    only = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    planned = [] if resume else plan_stages(settings, only, skip_sample or settings["skip_sample"])
    run_dir, node = choose_run_dir(project, settings, planned, node, resume)  # --node: its id
    lock = pipeline_lock(project, f"pipeline {run_dir.name}")
    lock.acquire()  # refuses, naming the holder, while another run is alive
    try:
        # a deploy killed half way must not be trained on: undo it first (refuses while a
        # deploy is in progress); deploys refuse while we hold the pipeline lock
        recovered = finish_pending_apply(project)
        if resume:
            state = load_state(run_dir)
            if effective_status(run_dir, state) == "running":
                raise RemoteOpsError(f"run {state['run_id']} is still running; follow it with "
                                     f"'invoke status {state['run_id']}'.")
            for stage in state["stages"]:
                chosen = bool(only) and stage["name"] in only
                kept = stage["status"] == "done" or (stage["status"] == "skipped"
                                                     and stage.get("reason") == "--skip-sample")
                if chosen or not kept:
                    stage.update(status="pending", failure_class=None, reason=None,
                                 fresh=chosen)
            state["status"] = "starting"
            state.setdefault("resumes", []).append(now_iso())
        else:
            current = project / ".remoteops" / "current.json"
            bundle = json.loads(current.read_text()).get("version") if current.is_file() \
                else None
            state = {"run_id": run_dir.name, "run_dir": str(run_dir),
                     "project_root": str(project), "created": now_iso(), "status": "starting",
                     "host": host_label, "bundle_version": bundle,
                     "options": {"gpu_gate": settings["gpu_gate"], "skip_sample": skip_sample,
                                 "stages": only, "heartbeat_seconds": float(
                                     settings["pipeline.heartbeat_seconds"]),
                                 "overrides": extra},
                     "stages": planned, **({"node": node} if node else {})}
        if recovered:
            state.setdefault("notes", []).append(
                f"undid an interrupted {recovered['undone']} ({recovered['label']}) first")
        from remoteops.plugins import check_executors, get_plugin_manager

        pending = [s for s in state["stages"] if s["status"] == "pending"
                   and s["kind"] in ("train", "command")]
        chosen = check_executors(get_plugin_manager(project, settings["plugins_dir"]), settings,
                                 [s["name"] for s in pending])  # an unknown one: refused here
        for stage in pending:
            stage["executor"] = (chosen[stage["name"]].describe() if stage["name"] in chosen
                                 else {"name": "process"})
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_settings(run_dir, settings)  # every process of the run reads these
        save_state(run_dir, state)
        # the runner inherits the locked descriptor: the lock is never free in between
        fd = lock.hand_over()
        proc = spawn_detached(agent_args("pipeline-run", "--root", str(project), "--run-dir",
                                         str(run_dir), "--lock-fd", str(fd)),
                              run_dir / "runner.log", project, pass_fds=(fd,))
        lock.update(pid=proc.pid, identity=process_identity(proc.pid), run_id=run_dir.name)
    except BaseException:
        lock.release()
        raise
    lock.let_go()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and proc.poll() is None:
        if load_state(run_dir)["status"] != "starting":
            break
        time.sleep(0.05)
    if proc.poll() not in (None, 0) and load_state(run_dir)["status"] == "starting":
        tail = (run_dir / "runner.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise RemoteOpsError(f"the pipeline runner failed to start: {tail[0] if tail else '?'}")
    emit({"run_id": state["run_id"], "run_dir": str(run_dir), "pid": proc.pid,
          "stages": [s["name"] for s in state["stages"]], "recovered": recovered,
          "node": state.get("node")}, as_json,
         f"started {state['run_id']} (pid {proc.pid})")


@click.command("pipeline-run")
@root_option
@click.option("--run-dir", required=True, help="The run directory (state.json inside).")
@click.option("--lock-fd", type=int, default=None,
              help="The pipeline lock, already held (pipeline-start hands it over).")
def pipeline_run(root, run_dir, lock_fd):
    """Run a prepared pipeline run in the foreground (pipeline-start uses this)."""
    from remoteops.server.runner import Runner

    runner = Runner(_root(root), Path(run_dir).resolve(), lock_fd=lock_fd)
    raise SystemExit(runner.run())


@click.command("pipeline-live")
@root_option
@json_option
def pipeline_live(root, as_json):
    """The run live on this root now (its runner holds the pipeline lock), if any."""
    from remoteops.common.runs import live_run

    live = live_run(_root(root))
    emit({"live": live}, as_json, f"live: {live['run_id']}" if live else "no live run")


def _current(run_dir: Path, state: dict) -> dict:
    """The running stage's latest step, loss, tokens/s and an ETA, from its files."""
    stage = next((s for s in state["stages"] if s["status"] == "running"), None)
    if stage is None:
        return {}
    out = {"stage": stage["name"], "attempt": stage["attempt"]}
    from remoteops.common.live_status import read_status
    live = read_status(run_dir, stage["name"])  # a stage on a live dataset: waiting, growing
    if live:
        if live.get("waiting") and live.get("since"):  # on this clock, not the laptop's
            live["waiting_s"] = round(max(0.0, time.time() - float(live["since"])), 1)
        out["data"] = live
    rows = []
    path = run_dir / "metrics.csv"
    if path.is_file():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("stage") == stage["name"]]
    train_rows = [r for r in rows if r.get("loss")]
    if train_rows:
        last = train_rows[-1]
        out.update(step=int(float(last["step"])), loss=float(last["loss"]),
                   tokens_per_s=float(last["tokens_per_s"] or 0) or None)
        log = run_dir / "logs" / f"{stage['name']}.log"
        total = re.findall(r"(\d+) steps, run dir", log.read_text(errors="replace")) \
            if log.is_file() else []
        if total and len(train_rows) > 1:
            t0, t1 = float(train_rows[0]["time"]), float(train_rows[-1]["time"])
            per_step = (t1 - t0) / max(1, out["step"] - int(float(train_rows[0]["step"])))
            out["total_steps"] = int(total[-1])
            out["eta_s"] = round(max(0, int(total[-1]) - out["step"]) * per_step, 1)
    return out


def _tail(path: Path, lines: int) -> list[str]:
    if not path.is_file():
        return []
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 64 * 1024))
        return fh.read().decode("utf-8", "replace").splitlines()[-lines:]


@click.command("pipeline-status")
@root_option
@click.option("--run", "run_id", default=None, help="Run id (default: the latest).")
@click.option("--lines", default=8, show_default=True, help="Log lines to include.")
@json_option
def pipeline_status(root, run_id, lines, as_json):
    """A run's state, whether its runner is alive, current progress and last log lines."""
    from remoteops.common.errors import RemoteOpsError
    from remoteops.common.runs import effective_status, find_run, load_state, runner_health
    from remoteops.server.model_fetch import progress_status
    from remoteops.server.serving import listing

    project = _root(root)
    fetching = progress_status(project)  # fetch-model's download, running or failed lately
    try:
        run_dir = find_run(project, run_id)
    except RemoteOpsError:
        if run_id or not fetching:
            raise
        # no run yet, but the base model is on its way: that is what there is to show
        emit({"run_id": None, "status": "none", "stages": [], "base_model": fetching,
              "serving": listing(project, probe_http=False), "runner_health": {},
              "current": {}, "log_tail": [], "server_time": time.time()}, as_json,
             fetching["line"])
        return
    state = load_state(run_dir)
    current = _current(run_dir, state)
    log = run_dir / "logs" / f"{current['stage']}.log" if current else run_dir / "runner.log"
    data = {**state, "status": effective_status(run_dir, state),
            "serving": listing(project, probe_http=False), "base_model": fetching,
            "runner_health": runner_health(run_dir, state), "current": current,
            "log_tail": _tail(log, lines), "server_time": time.time()}
    emit(data, as_json, f"{state['run_id']}: {data['status']}")


@click.command("pipeline-logs")
@root_option
@click.option("--run", "run_id", default=None, help="Run id (default: the latest).")
@click.option("--stage", default=None, help="A stage's log (default: the runner's).")
@click.option("--offset", default=-1, show_default=True,
              help="Return the log from this byte offset (-1: only the last --lines lines).")
@click.option("--lines", default=50, show_default=True, help="Lines when --offset is -1.")
@json_option
def pipeline_logs(root, run_id, stage, offset, lines, as_json):
    """A run's log text, from an offset (for following) or its last lines."""
    from remoteops.common.runs import effective_status, find_run, load_state

    run_dir = find_run(_root(root), run_id)
    path = run_dir / "logs" / f"{stage}.log" if stage else run_dir / "runner.log"
    size = path.stat().st_size if path.is_file() else 0
    if offset < 0:
        text = "\n".join(_tail(path, lines)) + ("\n" if size else "")
    else:
        with open(path, "rb") if path.is_file() else open(os.devnull, "rb") as fh:
            fh.seek(min(offset, size))
            text = fh.read(1 << 20).decode("utf-8", "replace")
            size = fh.tell() if path.is_file() else 0
    state = load_state(run_dir)
    emit({"text": text, "offset": size, "status": effective_status(run_dir, state),
          "run_id": state["run_id"]}, as_json, text)


@click.command("pipeline-cancel")
@root_option
@click.option("--run", "run_id", default=None, help="Run id (default: the latest).")
@json_option
def pipeline_cancel(root, run_id, as_json):
    """Stop a run and its whole process tree (SIGTERM, then SIGKILL); mark it cancelled."""
    from remoteops.common.clock import now_iso
    from remoteops.common.runs import (find_run, load_state, run_settings, runner_alive,
                                       save_state, stop_grace)
    from remoteops.server.proctree import descendants

    project = _root(root)
    run_dir = find_run(project, run_id)
    state = load_state(run_dir)
    was = state["status"]
    grace = stop_grace(run_settings(run_dir, project))
    # only the process the state names (pid and start time): never one that reuses its pid
    if runner_alive(state):
        pid = state["runner"]["pid"]
        tree = descendants([pid])  # before the runner goes and its orphans are re-parented
        os.kill(pid, signal.SIGTERM)  # the runner stops its stage's tree and records it
        deadline = time.monotonic() + grace + 20
        while runner_alive(load_state(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        _stop_leftovers(tree, grace)
    for stage in state["stages"]:
        if stage.get("process") and stage["status"] == "running":
            _stop_leftovers({stage["process"]["pid"]: stage["process"].get("start")}, grace)
        if (stage.get("executor") or {}).get("job") and stage["status"] in ("running",
                                                                           "pending"):
            from remoteops.server.slurm_jobs import SlurmError, cancel  # the runner is gone

            try:
                cancel([stage["executor"]["job"]])
            except SlurmError:
                pass
    state = load_state(run_dir)
    if state["status"] in ("running", "starting"):
        state["status"] = "cancelled"
        for stage in state["stages"]:
            if stage["status"] in ("running", "pending"):
                stage.update(status="cancelled", reason="run cancelled", ended=now_iso())
        save_state(run_dir, state)
    emit({"run_id": state["run_id"], "was": was, "status": state["status"]}, as_json,
         f"{state['run_id']}: {state['status']}")


def _stop_leftovers(snapshot: dict, grace: float) -> None:
    """Stop what is left of a snapshot of a tree, checking each process's start time."""
    from remoteops.common.locks import process_start
    from remoteops.server.proctree import stop_tree

    roots = [p for p, start in snapshot.items() if start is None or process_start(p) == start]
    if roots:
        stop_tree(roots, grace)


@click.command("pipeline-runs")
@root_option
@json_option
def pipeline_runs(root, as_json):
    """Every run of the project: id, start, stage states, duration, best metrics."""
    from remoteops.common.runs import list_runs

    runs = list_runs(_root(root))
    emit({"runs": runs}, as_json, "\n".join(f"{r['run_id']} {r['status']}" for r in runs))


@click.command("pipeline-files")
@root_option
@click.option("--run", "run_id", default=None, help="Run id (default: the latest).")
@click.option("--with-checkpoints", is_flag=True, help="Also list checkpoints (large).")
@json_option
def pipeline_files(root, run_id, with_checkpoints, as_json):
    """The files `collect` brings back (the run directory and the stages' outputs), with the
    run's status, so one call tells collect all it needs."""
    from remoteops.common.runs import find_run, load_state

    project = _root(root)
    run_dir = find_run(project, run_id)
    listing = _listing(project, run_dir, load_state(run_dir), with_checkpoints)
    emit(listing, as_json, "\n".join(f["path"] for f in listing["files"]))


def _listing(project: Path, run_dir: Path, state: dict, with_checkpoints: bool) -> dict:
    from remoteops.common.runs import effective_status
    from remoteops.server.collect_list import list_run_files

    listing = list_run_files(project, run_dir, state, with_checkpoints)
    listing["state"] = {"status": effective_status(run_dir, state),
                        "stages": [{"name": s["name"], "status": s["status"]}
                                   for s in state["stages"]],
                        **({"node": state["node"]} if state.get("node") else {})}
    return listing


@click.command("pipeline-mark")
@root_option
@click.option("--run", "run_id", default=None, help="Run id (default: the latest).")
@click.option("--stage", required=True, help="Stage to mark (the laptop marks collect).")
@click.option("--status", "status", type=click.Choice(["done", "failed"]), required=True)
@click.option("--reason", default="", help="Why (for failed).")
@click.option("--list-files", is_flag=True,
              help="Answer with the run's files as pipeline-files does (after the rewrite).")
@json_option
def pipeline_mark(root, run_id, stage, status, reason, list_files, as_json):
    """Record a stage the laptop ran (collect) in the run's state; rewrite the summary."""
    from remoteops.common.clock import now_iso
    from remoteops.common.runs import find_run, load_state, run_settings, save_state

    project = _root(root)
    run_dir = find_run(project, run_id)
    state = load_state(run_dir)
    for entry in state["stages"]:
        if entry["name"] == stage:
            entry.update(status=status, reason=reason or None, ended=now_iso())
    if all(s["status"] in ("done", "skipped") for s in state["stages"]):
        state["status"] = "done"
    save_state(run_dir, state)
    from remoteops.server.reports import write_training_summary

    write_training_summary(run_dir, run_settings(run_dir, project))
    answer = {"run_id": state["run_id"], "status": state["status"]}
    if list_files:
        answer.update(_listing(project, run_dir, state, False))
    emit(answer, as_json, state["status"])


@click.command("after-stage")
@click.option("--stage", required=True, help="The training stage just evaluated.")
@click.option("--run-dir", required=True, help="The run directory.")
def after_stage(stage, run_dir):
    """Run the configured post-eval and quantization plugins for a stage."""
    from remoteops.common.runs import run_settings

    try:
        from remoteops.server.postprocess import run_after_stage
    except ModuleNotFoundError:
        click.echo("no post-processing installed")
        return
    result = run_after_stage(run_settings(Path(run_dir)), stage, Path(run_dir))
    click.echo(json.dumps(result, default=str)[:2000])


def register(group: click.Group) -> None:
    for command in (pipeline_start, pipeline_run, pipeline_live, pipeline_status, pipeline_logs,
                    pipeline_cancel, pipeline_runs, pipeline_files, pipeline_mark, after_stage):
        group.add_command(command)
