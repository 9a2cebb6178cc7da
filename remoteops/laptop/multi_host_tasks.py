"""The tasks on several hosts: precheck, deploy-bundle, rollback, backups, status, runs,
cancel and collect (``remote-train`` is ``multi_train``).

``host_group.fan_out`` calls these with the task's own arguments when ``--host`` names more
than one host (``a,b,c`` or ``@group``). Each does its single-host work on every host in
parallel (``multi_host.on_hosts``), prints every host's result under its name (``status``
and ``runs``: one table with a host column) and fails once, naming the failed hosts.

Per-host values: ``--run`` and ``--backup`` take one value for every host, or
``HOST=VALUE`` pairs (``--backup gpu1=20261126T101500Z-v3,gpu2=20261126T101502Z-v3``);
``rollback --backup v3`` rolls each host back to bundle version 3 (the latest backup there
that restores it).
"""

from __future__ import annotations

import sys
from typing import Any

from remoteops.common.config import Settings, load_settings
from remoteops.common.errors import ConfigError, RemoteOpsError
from remoteops.laptop.host_group import VERSION, check_folders, expand, folder_name
from remoteops.laptop.multi_host import (HostFailed, on_hosts, raise_if_failed, report,
                                         with_target)


def _settings(**flags: Any) -> Settings:
    return load_settings(flags=flags)


def per_host(text: str | None, hosts: list[str], what: str) -> dict[str, str | None]:
    """``--run``/``--backup``: one value for all hosts, or ``HOST=VALUE,HOST=VALUE``."""
    if not text or "=" not in text:
        return {h: text or None for h in hosts}
    out: dict[str, str | None] = {h: None for h in hosts}
    for pair in text.split(","):
        name, _, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if name not in out or not value:
            raise ConfigError(f"{what} {pair.strip()!r} does not name one of the hosts "
                              f"({', '.join(hosts)}) with a value; write {what} HOST=VALUE,...")
        out[name] = value
    return out


def _confirm_once(settings: Settings, yes: bool, non_interactive: bool | None, what: str,
                  hosts: list[str]) -> None:
    """Several hosts are confirmed once, before any is touched (--yes skips it)."""
    if yes or settings["assume_yes"]:
        return
    if non_interactive or settings["non_interactive"] or not sys.stdin.isatty():
        raise RemoteOpsError(f"{what} needs confirmation and this session is not interactive; "
                             "add --yes (or set TRAIN_SYNC_ASSUME_YES=1).")
    if input(f"{what} on {len(hosts)} hosts ({', '.join(hosts)})? [y/N] ").strip().lower() \
            not in ("y", "yes"):
        raise RemoteOpsError(f"{what} cancelled; nothing was changed.")


def _with_host(h: str, print_it) -> None:
    """Print a single-host result with its hints made to name the host
    (``invoke rollback --backup X`` -> ``invoke rollback --host h --backup X``)."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print_it()
    sys.stdout.write(buffer.getvalue().replace("invoke rollback --backup ",
                                               f"invoke rollback --host {h} --backup "))


def precheck(host=None, gpu_gate=None, project_root=None, trust_host=False, json=False):
    from remoteops.laptop.host_group import settings_for
    from remoteops.laptop.render import print_checks
    from remoteops.precheck import run_precheck

    settings = _settings(gpu_gate=gpu_gate, project_root=project_root)

    def work(h: str, target) -> tuple:
        mine = settings_for(settings, h)
        results = run_precheck(mine, target)
        value = (target.describe(), mine["gpu_gate"], results)
        failed = [r.name for r in results if r.status == "fail"]
        if failed:
            raise HostFailed(f"precheck failed: {', '.join(failed)}", value)
        return value

    def as_dict(value: tuple) -> dict:
        rows = [r.to_dict() for r in value[2]]
        return {"target": value[0], "gpu_gate": value[1], "checks": rows,
                "ok": not any(r["status"] == "fail" for r in rows)}

    group = on_hosts(expand(settings, host), with_target(settings, trust_host, work))
    report(group, lambda h, v: print_checks(*v, False), json, "precheck", as_dict)


def deploy_bundle(host=None, bundle=None, dry_run=False, yes=False, project_root=None,
                  trust_host=False, non_interactive=None, json=False):
    from remoteops.laptop.build import build_bundle
    from remoteops.laptop.deploy import deploy
    from remoteops.laptop.render import print_deploy, print_plan

    settings = _settings(project_root=project_root, non_interactive=non_interactive)
    hosts = expand(settings, host)
    if not dry_run:
        _confirm_once(settings, yes, non_interactive, "Apply this deploy", hosts)
    if not bundle:  # one bundle for every host: the same version and content everywhere
        built = build_bundle(settings)
        bundle = str(built.tar_path)
        if not json:
            print(f"bundle v{built.manifest.version} {built.manifest.content_id[:12]}: {bundle}")

    def work(h: str, target):
        return deploy(settings, target, bundle, dry_run=dry_run)

    def show(h: str, outcome) -> None:
        if dry_run:
            print_plan(outcome)
        _with_host(h, lambda: print_deploy(outcome, False))

    group = on_hosts(hosts, with_target(settings, trust_host, work))
    report(group, show, json, "deploy-bundle", lambda o: o.to_dict())


def _backup_for_version(target, version: int) -> str | None:
    """The latest backup on ``target`` whose rollback restores bundle ``version`` (None: the
    host has that version now)."""
    from remoteops.laptop.deploy import list_backups

    rows = list_backups(target)
    if rows and rows[-1]["version"] == version:  # a backup's version: the state it left
        return None
    picked = [r for r in rows if r.get("from_version") == version]
    if not picked:
        have = sorted({f"v{r['from_version']}" for r in rows if r.get("from_version")})
        raise RemoteOpsError(f"no backup on {target.describe()} restores v{version} (its "
                             f"backups restore: {', '.join(have) or 'none'}); see 'invoke "
                             "backups'.")
    return picked[-1]["name"]


def _print_rollback(result: dict) -> None:
    from remoteops.laptop.render import print_rollback

    if result.get("already"):
        print(f"already at v{result['already']}: nothing to roll back")
    else:
        print_rollback(result, False)


def rollback(backup=None, host=None, dry_run=False, yes=False, project_root=None,
             trust_host=False, non_interactive=None, json=False):
    from remoteops.laptop.deploy import rollback as roll_back

    settings = _settings(project_root=project_root, non_interactive=non_interactive)
    if host is None and backup and "=" in backup:  # the pairs name the hosts
        host = ",".join(p.partition("=")[0].strip() for p in backup.split(","))
    hosts = expand(settings, host)
    version = VERSION.fullmatch(backup or "")
    names = {} if version else per_host(backup, hosts, "--backup")
    missing = [h for h, name in names.items() if not name]
    if missing:
        raise ConfigError(f"--backup names no backup for {', '.join(missing)}; write --backup "
                          "HOST=NAME for each host, or --backup vN for a bundle version.")
    if not dry_run:
        _confirm_once(settings, yes, non_interactive, "Roll back", hosts)

    def work(h: str, target) -> dict:
        name = _backup_for_version(target, int(version.group(1))) if version else names[h]
        if name is None:
            return {"already": int(version.group(1))}
        return roll_back(settings, target, name, dry_run, None)

    group = on_hosts(hosts, with_target(settings, trust_host, work))
    report(group, lambda h, v: _with_host(h, lambda: _print_rollback(v)), json, "rollback")


def backups(host=None, project_root=None, trust_host=False, json=False):
    from remoteops.laptop.deploy import list_backups
    from remoteops.laptop.render import print_backups

    settings = _settings(project_root=project_root)

    def work(h: str, target) -> tuple:
        return target.describe(), list_backups(target)

    group = on_hosts(expand(settings, host), with_target(settings, trust_host, work))
    report(group, lambda h, v: print_backups(*v, False), json, "backups", lambda v: v[1])


def status(run=None, host=None, project_root=None, json=False, trust_host=False):
    from remoteops.laptop.multi_host_render import print_status_table
    from remoteops.laptop.remote_train import status as get_status

    settings = _settings(project_root=project_root)
    hosts = expand(settings, host)
    wanted = per_host(run, hosts, "--run")

    def work(h: str, target) -> dict:
        data = get_status(target, wanted[h])
        if data["status"] in ("failed", "dead"):
            raise HostFailed(f"run {data.get('run_id')} is {data['status']}", data)
        return data

    group = on_hosts(hosts, with_target(settings, trust_host, work))
    _table(group, json, print_status_table, "status")


def runs(host=None, project_root=None, trust_host=False, json=False):
    from remoteops.laptop.multi_host_render import print_runs_table

    settings = _settings(project_root=project_root)

    def work(h: str, target) -> list:
        return target.run_agent("pipeline-runs", "--root", target.project_root)["runs"]

    group = on_hosts(expand(settings, host), with_target(settings, trust_host, work))
    _table(group, json, print_runs_table, "runs")


def _table(group, as_json: bool, printer, what: str) -> None:
    """status and runs: one table with a host column, then the failed hosts' errors."""
    if as_json:
        from remoteops.tables import print_json

        print_json(group.to_dict())
    else:
        printer(group)
        for r in group.failed:
            print(f"{r.host}: error: {r.error}", file=sys.stderr)
    raise_if_failed(group, what)


def cancel(run=None, host=None, project_root=None, trust_host=False, json=False):
    settings = _settings(project_root=project_root)
    hosts = expand(settings, host)
    wanted = per_host(run, hosts, "--run")

    def work(h: str, target) -> dict:
        args = ["pipeline-cancel", "--root", target.project_root]
        return target.run_agent(*args, *(["--run", wanted[h]] if wanted[h] else []),
                                timeout=120)

    group = on_hosts(hosts, with_target(settings, trust_host, work))
    report(group, lambda h, d: print(f"{d['run_id']}: {d['status']} (was {d['was']})"), json,
           "cancel")


def collect(run=None, host=None, since=None, project_root=None, trust_host=False, json=False):
    """Each host's results go to ``outputs/<host>/...`` (one host keeps ``outputs/``); a run
    spanning the hosts comes from its node 0 into ``outputs/`` (``laptop/multi_node``)."""
    from remoteops.laptop.collect import parse_since
    from remoteops.laptop.multi_node import collect_part, show_collected

    settings = _settings(project_root=project_root)
    hosts = expand(settings, host)
    check_folders(hosts)
    wanted = per_host(run, hosts, "--run")
    cutoff = parse_since(since)

    def work(h: str, target) -> dict:  # a run spanning the hosts: from node 0 alone
        return collect_part(settings, target, wanted[h], cutoff, ["outputs", folder_name(h)])

    group = on_hosts(hosts, with_target(settings, trust_host, work))
    report(group, show_collected, json, "collect")


__all__ = ["precheck", "deploy_bundle", "rollback", "backups", "status", "runs", "cancel",
           "collect", "per_host"]
