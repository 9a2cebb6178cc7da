"""``remote-train`` on several hosts: one run per host, each with its own overrides.

The bundle is built once; then every host, in its own thread and SSH connection, is
deployed to, gets the base model if it lacks it, starts its run with its
``[hosts.NAME.overrides]`` (``pipeline-start --overrides``, saved in the run's
``settings.json`` and shown by ``status``), is followed (one line per stage change,
prefixed with the host's name) and collected into ``outputs/<host>/``. The command fails
once at the end, naming the hosts whose run did not finish ``done``. Ctrl-C detaches: the
runs go on, and ``invoke status --host ...`` shows them all.
"""

from __future__ import annotations

import time
from typing import Any

from remoteops.common.config import Settings, load_settings
from remoteops.common.runs import plan_stages
from remoteops.laptop.host_group import (check_folders, expand, folder_name, overrides_for,
                                         settings_for)
from remoteops.laptop.multi_host import HostFailed, on_hosts, report, say


class _HostFollower:
    """One line per stage change of one host's run (the single-host plain follower, named)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.seen: dict[str, str] = {}

    def __call__(self, data: dict | None, note: str) -> None:
        if note:
            say(self.host, note)
        for s in (data or {}).get("stages", []):
            if self.seen.get(s["name"]) != s["status"]:
                self.seen[s["name"]] = s["status"]
                why = f" ({s.get('failure_class')}: {s.get('reason')})" \
                    if s["status"] == "failed" else ""
                say(self.host, f"{time.strftime('%H:%M:%S')} {s['name']}: {s['status']}{why}")


def _header(settings: Settings, hosts: list[str], stages: list[str] | None,
            skip_sample: bool) -> list[str]:
    planned = [s["name"] for s in plan_stages(settings, stages, skip_sample)
               if s["status"] != "skipped"]
    lines = [f"remote-train on {len(hosts)} hosts, one run each: {', '.join(planned)}"]
    for h in hosts:
        extra = overrides_for(settings, h)
        shown = ", ".join(f"{k} = {v!r}" for k, v in sorted(extra.items()))
        lines.append(f"  - {h}: " + (f"overrides {shown}" if shown else "the project's settings")
                     + f"; results to outputs/{folder_name(h)}/")
    return lines


def remote_train(host=None, skip_sample=False, stages=None, resume=None, project_root=None,
                 non_interactive=False, yes=False, gpu_gate=None, detach=False, no_deploy=False,
                 trust_host=False, json=False) -> None:
    from remoteops.laptop.collect import in_place
    from remoteops.laptop.multi_host_tasks import _confirm_once, per_host
    from remoteops.laptop.remote_train import TrainRequest, check_executors_here

    settings = load_settings(flags=dict(
        project_root=project_root, gpu_gate=gpu_gate,
        non_interactive=True if non_interactive else None, assume_yes=True if yes else None,
        skip_sample=True if skip_sample else None))
    hosts = expand(settings, host)
    check_folders(hosts)
    only = [s.strip() for s in stages.split(",")] if stages else None
    skip = bool(settings["skip_sample"])
    resumes = per_host(resume if isinstance(resume, str) else None, hosts, "--resume")
    requests = {h: TrainRequest(h, only, skip, resumes[h] or bool(resume), detach,
                                not no_deploy) for h in hosts}
    from remoteops.laptop.multi_node import spanning_run, train_spanning

    nnodes = spanning_run(settings, only, skip, hosts)  # a stage with nnodes > 1: ONE run
    if nnodes:
        return train_spanning(settings, hosts, nnodes, only, skip, requests, trust_host, yes,
                              non_interactive, json, no_deploy, resume)
    for h in hosts:  # an unknown executor, on any host: refused before anything starts
        check_executors_here(settings_for(settings, h), requests[h])
    if not json:
        for line in _header(settings, hosts, only, skip):
            print(line, flush=True)
    _confirm_once(settings, yes, non_interactive, "Start training", hosts)
    bundle = shared_bundle(settings, no_deploy, resume)

    def work(h: str, target) -> dict:
        return _train_one(settings, h, target, requests[h], bundle,
                          in_place(target, settings.project_dir), trust_host)

    run_detachable(settings, hosts, trust_host, work, _show, json,
                   f"the runs go on. Follow them with: invoke status --host "
                   f"{host or settings['default_host']}")


def shared_bundle(settings: Settings, no_deploy: bool, resume) -> str | None:
    """The bundle every host gets (built once, so all run the same version), or None when
    nothing is deployed."""
    if no_deploy or not settings["pipeline.deploy"] or resume:
        return None
    from remoteops.laptop.build import build_bundle

    return str(build_bundle(settings).tar_path)


def run_detachable(settings: Settings, hosts: list[str], trust_host: bool, work,
                   show, json: bool, detached: str) -> None:
    """``work(host, target)`` on every host in parallel, then each host's result; Ctrl-C
    leaves the runs going and prints ``detached``."""
    from remoteops.laptop.multi_host import with_target

    try:
        group = on_hosts(hosts, with_target(settings, trust_host, work))
    except KeyboardInterrupt:
        print(f"\ndetached (Ctrl-C); {detached}")
        return
    report(group, show, json, "remote-train")


def prepare_host(settings: Settings, h: str, target, req, bundle: str | None,
                 here: bool) -> None:
    """Deploy the bundle to ``h`` and upload the base model if it lacks it."""
    from remoteops.laptop.deploy import deploy
    from remoteops.laptop.remote_train import base_model_to_server, refuse_if_live

    mine = settings_for(settings, h)
    if bundle and not here:
        refuse_if_live(target)
        outcome = deploy(settings, target, bundle)
        if outcome.applied:
            say(h, f"deployed v{outcome.applied['version']} (backup "
                   f"{outcome.applied['backup_name']})")
    if req.deploy:
        sent = base_model_to_server(mine, target, req, None, lambda line: say(h, f"base model "
                                                                                  f"{line}"))
        if sent and sent["sent"]:
            from remoteops.laptop.fetch_model import describe

            say(h, f"base model {describe(sent)}")


def _train_one(settings: Settings, h: str, target, req, bundle: str | None, here: bool,
               trust_host: bool) -> dict:
    from remoteops.laptop.remote_train import collect_and_report, follow, start
    from remoteops.laptop.targets import open_target

    mine = settings_for(settings, h)
    prepare_host(settings, h, target, req, bundle, here)
    started = start(mine, target, req, overrides_for(settings, h))
    run_id = started["run_id"]
    say(h, f"started {run_id} on {target.describe()} (runner pid {started['pid']})")
    if req.detach:
        return {"run_id": run_id, "status": "started"}
    data, target = follow(lambda: open_target(settings, h, trust_host=trust_host), target, run_id,
                          _HostFollower(h), float(mine["pipeline.poll_seconds"]))
    into = ["outputs", folder_name(h)]
    collected = collect_and_report(settings, target, run_id, None, into=into)
    result = {"run_id": run_id, "status": data["status"], "collected": collected,
              "overrides": overrides_for(settings, h)}
    if data["status"] != "done":
        failed = next((s for s in data["stages"] if s["status"] == "failed"), None)
        why = (f"stage {failed['name']} failed ({failed['failure_class']}): "
               f"{str(failed['reason']).rstrip('.')}" if failed else f"the run is {data['status']}")
        raise HostFailed(f"{why}; fix it and continue with: invoke remote-train --host {h} "
                         f"--resume {run_id}", result)
    return result


def _show(h: str, value: dict[str, Any]) -> None:
    if value.get("status") == "started":
        print(f"{value['run_id']}: started (detached); follow with: invoke status --host {h}")
        return
    from remoteops.laptop.remote_train_cli import print_collected

    print(f"{value['run_id']}: {value['status']}")
    print_collected(value["collected"], False)


__all__ = ["remote_train"]
