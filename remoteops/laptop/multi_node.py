"""``remote-train --host a,b`` when a stage spans machines: ONE run across the hosts.

A planned stage with ``executor = "torchrun"`` and ``nnodes`` > 1 (``common/multi_node``)
turns ``--host @pair`` from a sweep (one run per host) into one run spanning them. The
number of hosts must equal ``nnodes``; a mismatch is refused in one line before anything
is built. Then, with the bundle built once, every host in its own thread and connection:

1. is deployed to and gets the base model if it lacks it;
2. starts its part of the run under the SAME run id (``pipeline-start --node``): the first
   host first, as node 0, whose agent picks a free rendezvous port (or the configured
   ``rdzv_port``); the others, once they know it, as node 1, 2, ... The rendezvous
   address is the first host's ``rdzv_host`` (``[hosts.NAME] rdzv_host``, e.g. a private
   interconnect address), else the address the laptop reaches it at;
3. is followed, one line per stage change (``[h2] ...``). When one host's run ends without
   ``done``, the laptop waits ``GRACE_S`` for the others to fail on their own (torch's
   collectives break at once when a peer dies), then cancels any still running.

Only the first host is collected (``outputs/``, the one-host layout): it ran everything
but the other nodes' share of the spanning stages, and holds the adapter and reports.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from remoteops.common.clock import utc_stamp
from remoteops.common.config import Settings
from remoteops.common.errors import ConfigError
from remoteops.common.multi_node import check_layout, node_record, spanning
from remoteops.common.runs import plan_stages
from remoteops.laptop.multi_host import HostFailed, say

GRACE_S = 30.0  # after one host's run failed: the others' own verdict first, then cancel


def spanning_run(settings: Settings, only: list[str] | None, skip: bool,
                 hosts: list[str]) -> int | None:
    """The number of machines the run spans (None: a sweep); ConfigError on a mismatch."""
    planned = [s["name"] for s in plan_stages(settings, only, skip) if s["status"] == "pending"]
    return check_layout(settings, planned, hosts)


def rdzv_host(settings: Settings, host: str) -> str:
    """The address the other hosts reach ``host`` at: ``[hosts.NAME] rdzv_host``, else the
    address ssh connects to (``HostName`` of an ~/.ssh/config alias included)."""
    import os

    from remoteops.laptop.ssh import parse_host
    from remoteops.laptop.ssh_config import SYSTEM_CONFIG, resolve

    entry = settings["hosts"].get(host) or {}
    if entry.get("rdzv_host"):
        return str(entry["rdzv_host"])
    if host == "local" and not entry:
        raise ConfigError("a run spanning machines starts on SSH hosts; the local target is "
                          "not one: name [hosts] entries in --host.")
    _, name, _ = parse_host(str(entry.get("hostname") or entry.get("host") or host))
    config = os.path.expanduser(settings["ssh.config_file"])
    return resolve(name, config_files=[(config, True), (SYSTEM_CONFIG, False)]).hostname


class _Span:
    """What the hosts' threads share: the run id, the rendezvous, and a failure."""

    def __init__(self, hosts: list[str], run_id: str, address: str) -> None:
        self.hosts, self.run_id, self.address = hosts, run_id, address
        self.port: int | None = None
        self.started = threading.Event()  # node 0 started (self.port known) or failed
        self.failed_at: float | None = None
        self.failed_host = ""
        self.lock = threading.Lock()

    def fail(self, host: str) -> None:
        with self.lock:
            if self.failed_at is None:
                self.failed_at, self.failed_host = time.monotonic(), host
        self.started.set()


def header(settings: Settings, hosts: list[str], nnodes: int, only, skip: bool,
           address: str) -> list[str]:
    planned = [s["name"] for s in plan_stages(settings, only, skip) if s["status"] != "skipped"]
    spans = spanning(settings, planned)
    per = {s: (settings["stages"][s] or {}).get("nproc_per_node") for s in spans}
    layout = ", ".join(f"{s} (torchrun {per[s] or 'a process per GPU'} x {nnodes} machines)"
                       for s in spans)
    return [f"remote-train on {len(hosts)} hosts, ONE run spanning them: {layout}",
            f"  - {hosts[0]}: node 0, rendezvous at {address}, runs {', '.join(planned)}; "
            f"results to outputs/"] + [
            f"  - {h}: node {i}, runs {', '.join(spans)}" for i, h in enumerate(hosts[1:], 1)]


def train_spanning(settings: Settings, hosts: list[str], nnodes: int, only: list[str] | None,
                   skip: bool, requests: dict, trust_host: bool, yes: bool,
                   non_interactive: bool, json: bool, no_deploy: bool, resume) -> None:
    from remoteops.laptop.multi_host_tasks import _confirm_once
    from remoteops.laptop.remote_train import check_executors_here

    if resume is not None and not isinstance(resume, str) and resume:
        raise ConfigError("--resume of a run spanning several hosts takes its run id "
                          "(--resume run_...; see invoke runs --host " + ",".join(hosts) + ").")
    check_executors_here(settings, requests[hosts[0]])
    address = rdzv_host(settings, hosts[0])
    if not json:
        for line in header(settings, hosts, nnodes, only, skip, address):
            print(line, flush=True)
    _confirm_once(settings, yes, non_interactive, "Start one training run", hosts)
    from remoteops.laptop.multi_train import run_detachable, shared_bundle

    bundle = shared_bundle(settings, no_deploy, resume)  # every node runs the same code
    run_id = resume if isinstance(resume, str) else f"run_{utc_stamp()}"
    span = _Span(hosts, run_id, address)

    def work(h: str, target) -> dict:
        try:
            return _node(settings, h, target, requests[h], bundle, span, trust_host)
        except BaseException:
            span.fail(h)
            raise

    run_detachable(settings, hosts, trust_host, work, _show, json,
                   f"the run goes on on every host. Follow it with: invoke status --host "
                   f"{','.join(hosts)}")


def _node(settings: Settings, h: str, target, req, bundle: str | None, span: _Span,
          trust_host: bool) -> dict:
    from remoteops.laptop.collect import in_place
    from remoteops.laptop.multi_train import _HostFollower, prepare_host
    from remoteops.laptop.remote_train import collect_and_report, follow
    from remoteops.laptop.targets import open_target

    rank = span.hosts.index(h)
    prepare_host(settings, h, target, req, bundle, in_place(target, settings.project_dir))
    if rank and not span.started.wait(timeout=600) or span.failed_at is not None:
        raise HostFailed(f"not started: {span.failed_host or span.hosts[0]} failed first", {})
    node = node_record(rank, span.hosts, span.run_id, span.address, span.port or 0)
    started = _start(settings, target, req, node)
    if rank == 0:
        span.port = int(started["node"]["rdzv_port"])
        span.started.set()
    say(h, f"started {span.run_id} as node {rank} of {len(span.hosts)} on {target.describe()}"
           f" (runner pid {started['pid']}; rendezvous {span.address}:{span.port})")
    if req.detach:
        return {"run_id": span.run_id, "status": "started", "node": rank}
    follower = _HostFollower(h)
    cancelled = []

    def show(data: dict | None, note: str) -> None:
        follower(data, note)
        if data and data["status"] in ("failed", "cancelled", "dead"):
            span.fail(h)
        late = span.failed_at is not None and time.monotonic() - span.failed_at > GRACE_S
        if late and not cancelled and data and data["status"] == "running":
            cancelled.append(True)
            say(h, f"cancelling: the run failed on {span.failed_host}")
            target.run_agent("pipeline-cancel", "--root", target.project_root, "--run",
                             span.run_id, timeout=120)

    poll = float(settings["pipeline.poll_seconds"])
    data, target = follow(lambda: open_target(settings, h, trust_host=trust_host), target,
                          span.run_id, show, poll)
    result = {"run_id": span.run_id, "status": data["status"], "node": rank, "collected": None}
    if rank == 0:
        result["collected"] = collect_and_report(settings, target, span.run_id, None)
    if data["status"] != "done":
        failed = next((s for s in data["stages"] if s["status"] in ("failed", "cancelled")), None)
        why = (f"stage {failed['name']} {failed['status']} ({failed.get('failure_class')}): "
               f"{str(failed.get('reason')).rstrip('.')}" if failed
               else f"the run is {data['status']}")
        raise HostFailed(f"{why}; see invoke status --host {','.join(span.hosts)}", result)
    return result


def _start(settings: Settings, target, req, node: dict) -> dict:
    import json

    from remoteops.laptop.remote_train import start

    if req.resume:  # every node resumes its own part of the same run
        return start(settings, target, req)
    return start(settings, target, req, node=json.dumps(node, sort_keys=True))


def _show(h: str, value: dict[str, Any]) -> None:
    if value.get("status") == "started":
        print(f"{value['run_id']}: node {value['node']} started (detached); follow with: "
              f"invoke status --host {h}")
        return
    print(f"{value['run_id']}: node {value['node']} {value['status']}")
    if value.get("collected"):
        from remoteops.laptop.remote_train_cli import print_collected

        print_collected(value["collected"], False)


def collect_part(settings: Settings, target, run_id: str | None, since, folder: list[str]
                 ) -> dict:
    """``collect --host a,b`` on one host: a run spanning hosts is collected from node 0
    alone, into ``outputs/`` (``{"node": k, "skipped": ...}`` on the others); any other run
    into ``folder`` (``outputs/<host>/``)."""
    from remoteops.laptop.remote_train import collect_and_report, status

    node = status(target, run_id, lines=0).get("node")
    if node and node["rank"] > 0:
        return {"node": node["rank"], "skipped": f"node {node['rank']} of a run spanning "
                f"{','.join(node['hosts'])}: its results are collected from "
                f"{node['hosts'][0]} (node 0)"}
    return collect_and_report(settings, target, run_id, None, since,
                              into=None if node else folder)


def show_collected(h: str, value: dict[str, Any]) -> None:
    if value.get("skipped"):
        print(value["skipped"])
        return
    from remoteops.laptop.remote_train_cli import print_collected

    print_collected(value, False)


__all__ = ["spanning_run", "rdzv_host", "train_spanning", "collect_part", "show_collected",
           "GRACE_S"]
