"""This machine's part of a run that spans several (``common/multi_node``), on the agent side.

``pipeline-start --node JSON`` (``start``): the run gets the id the laptop chose (the same on
every host), node 0 picks a free rendezvous port unless one is configured, the stages
that do not span are skipped on the other nodes, and ``state.json`` records ``node``. A
stage with ``nnodes`` > 1 started without ``--node`` and without its own ``rdzv_endpoint``
is refused there, in one line (``refuse_unspanned``).

The runner asks ``bind`` for a spanning stage's torchrun options, ``retries`` whether a
failure may be retried (never, on a spanning stage), ``judged`` for the class the run
reports, and ``evaluates`` whether evaluation and the after-stage plugins run here (node 0).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from remoteops.common.errors import ConfigError, RemoteOpsError
from remoteops.common.multi_node import bind as bind_options
from remoteops.common.multi_node import check_node, lost, plan_node, spanning


def _free_port() -> int:
    """A TCP port free on every address of this machine now (the rendezvous binds it when
    the first spanning stage starts; another program may take it in between, which torchrun
    then reports as an address in use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def start(raw: str, settings: Any, project: Path, stages: list[dict]) -> tuple[Path, dict]:
    """The run directory and the checked ``node`` record of ``pipeline-start --node``."""
    from remoteops.common.runs import RUNS_DIR

    try:
        node = check_node(json.loads(raw))
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(str(exc)) from None
    spans = spanning(settings, [s["name"] for s in stages if s["status"] == "pending"])
    if not spans:
        raise ConfigError(f"--node starts a part of a multi-node run, but no planned stage "
                          f"has executor = \"torchrun\" and nnodes = {node['nnodes']}.")
    wrong = {s: n for s, n in spans.items() if n != node["nnodes"]}
    if wrong:
        stage, n = next(iter(wrong.items()))
        raise ConfigError(f"stage {stage} spans nnodes = {n} machines but the run has "
                          f"{node['nnodes']} hosts; give it nnodes = {node['nnodes']}.")
    ports = {int(settings["stages"][s]["rdzv_port"]) for s in spans
             if settings["stages"][s].get("rdzv_port")}
    if ports:
        node["rdzv_port"] = min(ports)
    elif node["rdzv_port"] == 0:
        if node["rank"] != 0:
            raise ConfigError("--node: only node 0 chooses the rendezvous port.")
        node["rdzv_port"] = _free_port()
    run_dir = project / RUNS_DIR / node["run_id"]
    if run_dir.exists():
        raise RemoteOpsError(f"run {node['run_id']} already exists under {project}; start a "
                             f"new run (invoke remote-train) or resume it (--resume).")
    plan_node(stages, node, spans)
    node["stages"] = sorted(spans)
    return run_dir, node


def choose_run_dir(project: Path, settings: Any, planned: list[dict], node: str | None,
                   resume: str | None) -> tuple[Path, dict | None]:
    """``pipeline-start``'s run directory and node record: a part of a spanning run gets the
    run id the laptop chose; a new run of one host gets a fresh one (and is refused if a
    stage spans machines); a resumed run keeps its own (and its ``node``)."""
    from remoteops.common.rundir import new_run_dir
    from remoteops.common.runs import find_run

    if resume:
        return find_run(project, resume), None
    if node:
        return start(node, settings, project, planned)
    refuse_unspanned(settings, [s["name"] for s in planned if s["status"] == "pending"])
    return new_run_dir(project), None


def refuse_unspanned(settings: Any, names: list[str]) -> None:
    """A stage that spans machines, started on one host alone: one line saying how."""
    for stage, n in spanning(settings, names).items():
        if not (settings["stages"][stage] or {}).get("rdzv_endpoint"):
            raise ConfigError(f"stages.{stage}.nnodes is {n}: the stage spans {n} machines; "
                              f"start the run on {n} hosts at once (invoke remote-train --host "
                              f"a,b or --host @GROUP), or set rdzv_endpoint = \"HOST:PORT\" in "
                              f"[stages.{stage}] and start the other machines yourself.")


def spans(state: dict, stage: str) -> bool:
    node = state.get("node")
    return bool(node) and stage in node.get("stages", ())


def bind(executor: Any, state: dict, stage: str) -> None:
    """Give a spanning stage's executor this node's rank and the rendezvous."""
    if spans(state, stage):
        executor.table.update(bind_options(executor.table, state["node"], stage,
                                           state["run_id"]))


def retries(state: dict, stage: str) -> bool:
    """May a failed attempt of ``stage`` be retried on this host alone? Not a spanning one."""
    return not spans(state, stage)


def judged(state: dict, stage: str, klass: str | None, reason: str | None
           ) -> tuple[str | None, str | None]:
    return lost(klass, reason, state["node"]) if spans(state, stage) else (klass, reason)


def evaluates(state: dict) -> bool:
    """Evaluation and after-stage plugins run on node 0 only (it holds the adapter)."""
    node = state.get("node")
    return not node or node["rank"] == 0


__all__ = ["choose_run_dir", "start", "refuse_unspanned", "spans", "bind", "retries", "judged", "evaluates"]
