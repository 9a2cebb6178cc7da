"""One training run spanning several machines: which stages span, and each machine's part.

A stage spans machines when it runs under torchrun with ``nnodes`` > 1::

    [stages.all]
    executor = "torchrun"
    nnodes = 2               # machines; nproc_per_node processes on each
    # rdzv_port = 29400      # default: a free port on the first host, chosen when it starts
    # rdzv_timeout = 600     # seconds the machines wait for each other at each stage

``remote-train --host @pair`` (as many hosts as ``nnodes``) then starts ONE run: the same
run id on every host. The first host is node 0: it runs the whole pipeline (precheck,
command stages, evaluation, after-stage plugins, reports), hosts the rendezvous and holds
global rank 0, so the signals, metrics and adapter are written there and ``collect`` brings
them from there. Every other host runs only the spanning stages, as node 1, 2, ... Without
a shared filesystem each node keeps its own checkpoints (HF ``save_on_each_node``), so any
node can resume. A spanning stage is never retried alone (the other nodes would wait at a
rendezvous nobody else joins): any failure fails it on every node, and a node whose
trainer died or lost its peers fails with ``node_lost``.

Each runner learns its part from ``state.json``'s ``node``::

    {"rank": 1, "nnodes": 2, "hosts": ["h1", "h2"], "rdzv_host": "10.0.0.5",
     "rdzv_port": 29400}

Pure data: the laptop checks the layout with it, the agent plans each node's stages.
"""

from __future__ import annotations

import re
from typing import Any

from remoteops.common.errors import ConfigError

RUN_ID = re.compile(r"run_[0-9A-Za-z_]+")
# Failure classes that mean "this node's part ended under it": on a spanning stage they
# are the loss of a node (its own, or a peer's that broke the collective).
LOST = ("process_died", "cuda", "stale")


def spanning(settings: Any, names: list[str] | None = None) -> dict[str, int]:
    """``{stage: nnodes}`` of the stages (of ``names``, default all) that span machines."""
    tables = settings["stages"] or {}
    out = {}
    for name in (names if names is not None else list(tables)):
        table = tables.get(name) or {}
        if table.get("executor") == "torchrun" and int(table.get("nnodes") or 1) > 1:
            out[name] = int(table["nnodes"])
    return out


def check_layout(settings: Any, stages: list[str], hosts: list[str]) -> int | None:
    """The number of machines the planned ``stages`` span (None: none spans), refused in one
    line when it does not match the hosts named (``hosts``) or differs between stages. On one
    host, a stage with its own ``rdzv_endpoint`` is left alone: its other machines are started
    by hand, as before spanning runs existed."""
    wanted = {name: n for name, n in spanning(settings, stages).items()
              if not (settings["stages"][name] or {}).get("rdzv_endpoint") or len(hosts) > 1}
    if not wanted:
        return None
    counts = sorted(set(wanted.values()))
    if len(counts) > 1:
        shown = ", ".join(f"{s} {n}" for s, n in wanted.items())
        raise ConfigError(f"the stages span different numbers of machines (nnodes: {shown}); "
                          f"give every multi-node stage the same nnodes in remoteops.toml.")
    nnodes = counts[0]
    stage = next(iter(wanted))
    if len(hosts) != nnodes:
        named = ", ".join(hosts)
        raise ConfigError(f"stage {stage} spans nnodes = {nnodes} machines but --host names "
                          f"{len(hosts)} ({named}); name {nnodes} hosts (--host a,b or a "
                          f"[groups] of {nnodes}) or change nnodes; nothing was started.")
    return nnodes


def node_record(rank: int, hosts: list[str], run_id: str, rdzv_host: str,
                rdzv_port: int = 0) -> dict[str, Any]:
    """What ``pipeline-start --node`` takes (``rdzv_port`` 0 on node 0: choose a free one)."""
    return {"rank": rank, "nnodes": len(hosts), "hosts": list(hosts), "run_id": run_id,
            "rdzv_host": rdzv_host, "rdzv_port": int(rdzv_port)}


def check_node(node: Any) -> dict[str, Any]:
    """``pipeline-start --node``'s JSON, checked (ValueError, one line)."""
    if not isinstance(node, dict):
        raise ValueError("--node takes a JSON object (remote-train sends it).")
    for key, kind in (("rank", int), ("nnodes", int), ("hosts", list), ("run_id", str),
                      ("rdzv_host", str), ("rdzv_port", int)):
        if not isinstance(node.get(key), kind):
            raise ValueError(f"--node lacks {key} (remote-train sends it).")
    if not 0 <= node["rank"] < node["nnodes"] == len(node["hosts"]) or node["nnodes"] < 2:
        raise ValueError(f"--node: rank {node['rank']} of {node['nnodes']} nodes does not fit "
                         f"{len(node['hosts'])} hosts.")
    if not RUN_ID.fullmatch(node["run_id"]):
        raise ValueError(f"--node: run id {node['run_id']!r} is not run_<stamp>.")
    if not 0 <= node["rdzv_port"] < 65536 or not node["rdzv_host"].strip():
        raise ValueError("--node: the rendezvous needs a host and a port 0-65535.")
    return node


def plan_node(stages: list[dict], node: dict, spans: dict[str, int]) -> None:
    """On nodes other than 0, every stage that does not span is node 0's alone: skipped."""
    if node["rank"] == 0:
        return
    for stage in stages:
        if stage["name"] not in spans and stage["status"] == "pending":
            stage.update(status="skipped", reason=f"runs on node 0 ({node['hosts'][0]})")


def bind(table: dict, node: dict, stage: str, run_id: str) -> dict:
    """The torchrun options of ``stage`` on this node of a spanning run."""
    endpoint = table.get("rdzv_endpoint") or f"{node['rdzv_host']}:{node['rdzv_port']}"
    return {"node_rank": node["rank"], "nnodes": node["nnodes"], "rdzv_endpoint": endpoint,
            "rdzv_id": f"{run_id}-{stage}", "hosts": list(node["hosts"])}


def lost(klass: str | None, reason: str | None, node: dict) -> tuple[str | None, str | None]:
    """A spanning stage's failure, as the run reports it: a dead process is a lost node."""
    if klass not in LOST:
        return klass, reason
    hosts = ",".join(node["hosts"])
    return "node_lost", (f"{reason} (node {node['rank']} of {node['nnodes']}; a multi-node stage "
                         f"stops on every node when one node's part ends; see invoke status "
                         f"--host {hosts})")


def part(executor: dict | None) -> str:
    """``, node 1 of 2`` for a spanning stage's executor record, else ``""``."""
    if not executor or executor.get("node_rank") is None:
        return ""
    hosts = executor.get("hosts") or []
    rank = int(executor["node_rank"])
    where = f" ({hosts[rank]})" if rank < len(hosts) else ""
    return f", node {rank}{where} of {executor.get('nnodes')}"


__all__ = ["spanning", "check_layout", "node_record", "check_node", "plan_node", "bind", "lost",
           "part", "RUN_ID"]
