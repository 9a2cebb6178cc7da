"""The laptop-side commands as an invoke ``Collection``.

A training project gets every task with a two-line ``tasks.py``::

    from remoteops.laptop.tasks import make_namespace
    ns = make_namespace()

and the ``remoteops`` console script runs the same tasks with no tasks.py.
Each task parses its flags, makes one library call and prints the result.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from invoke import Collection, task
from invoke.exceptions import Exit

from remoteops.common.errors import RemoteOpsError
from remoteops.laptop.host_group import fan_out
from remoteops.laptop.task_wrap import friendly

HOST_HELP = "local, a [hosts] name from remoteops.toml, an ~/.ssh/config alias, or user@host:port"
HOSTS_HELP = HOST_HELP + "; several at once: a,b,c or @GROUP ([groups.GROUP] hosts = [...])"


def _settings(**flags: Any):
    from remoteops.common.config import load_settings

    return load_settings(flags=flags)


@task(help={"host": HOSTS_HELP,
            "gpu-gate": "strict (driver problem fails), warn (it warns), or off",
            "project-root": "the project's folder on the target (env TRAIN_SYNC_PROJECT_ROOT)",
            "trust-host": "record an unknown host key in .remoteops/known_hosts (accept-new)",
            "json": "print JSON instead of a table"})
@fan_out("precheck", friendly)
def precheck(c, host=None, gpu_gate=None, project_root=None, trust_host=False, json=False):
    """Check the server is ready to train (Python, packages, GPU gate, disk, RAM, data)."""
    from remoteops.precheck import run_precheck
    from remoteops.laptop.render import print_checks
    from remoteops.laptop.targets import open_target

    settings = _settings(gpu_gate=gpu_gate, project_root=project_root)
    with open_target(settings, host, trust_host=trust_host) as target:
        results = run_precheck(settings, target)
        print_checks(target.describe(), settings["gpu_gate"], results, json)
    if any(r.status == "fail" for r in results):
        raise Exit(code=1)


@task(help={"json": "print JSON: each setting's value and source"})
@friendly
def config(c, json=False):
    """Show the effective settings and where each one came from."""
    from remoteops.laptop.render import print_settings

    settings = _settings()
    print_settings(settings.items(), settings.files, json)


@task(help={"json": "print JSON"})
@friendly
def plugins(c, json=False):
    """List the loaded plugins: name, version, source, hooks."""
    from remoteops.plugins import get_plugin_manager
    from remoteops.tables import print_plugins

    settings = _settings()
    print_plugins(get_plugin_manager(settings.project_dir, settings["plugins_dir"]).infos(), json)


@task(help={"spec": "a pip requirement (name, name==1.0) or a path to a plugin project",
            "upgrade": "upgrade it if already installed", "editable": "install a path editable"})
@friendly
def install_plugin(c, spec, upgrade=False, editable=False):
    """Install a plugin package into remoteops' own Python environment."""
    from remoteops.laptop.plugin_install import install_plugin as install

    for line in install(spec, upgrade=upgrade, editable=editable):
        print(line)


@task(help={"name": "the distribution name of the plugin package"})
@friendly
def uninstall_plugin(c, name):
    """Uninstall a plugin package from remoteops' own Python environment."""
    from remoteops.laptop.plugin_install import uninstall_plugin as uninstall

    print(uninstall(name))


@task(help={"path": "the project folder (default: here)",
            "force": "overwrite remoteops.toml / tasks.py if they exist",
            "demo": "create (or complete) the demo project in FOLDER: tiny model, demo data"})
@friendly
def init(c, path=".", force=False, demo=None):
    """Write a starter remoteops.toml and a two-line tasks.py (or --demo FOLDER)."""
    from remoteops.laptop.scaffold import init_demo, init_project

    lines = init_demo(Path(demo)) if demo else init_project(Path(path), force=force)
    for line in lines:
        print(line)


def _confirm(settings, yes: bool, non_interactive: bool | None, what: str):
    """A confirm(plan) callback: --yes (or assume_yes) skips it; no TTY refuses."""
    if yes or settings["assume_yes"]:
        return None
    if non_interactive or settings["non_interactive"] or not sys.stdin.isatty():
        raise RemoteOpsError(f"{what} needs confirmation and this session is not interactive; "
                             "add --yes (or set TRAIN_SYNC_ASSUME_YES=1).")

    def ask(plan: dict) -> bool:
        return input(f"{what}? [y/N] ").strip().lower() in ("y", "yes")

    return ask


@task(help={"out": "folder for the bundle (default: bundle.out_dir, bundles/)",
            "json": "print JSON"})
@friendly
def build_bundle(c, out=None, json=False):
    """Build a versioned bundle of the project's code, configs and data."""
    from remoteops.laptop.build import build_bundle as build
    from remoteops.laptop.render import print_built

    print_built(build(_settings(), out), json)


@task(help={"host": HOSTS_HELP, "bundle": "a bundle .tar.zst to deploy (default: build one now)",
            "dry-run": "show the plan; change nothing on the server",
            "yes": "do not ask for confirmation", "project-root": "the project's folder on the "
            "target (env TRAIN_SYNC_PROJECT_ROOT)", "trust-host": "record an unknown host key",
            "non-interactive": "never prompt (env TRAIN_SYNC_NON_INTERACTIVE)",
            "json": "print JSON"})
@fan_out("deploy-bundle", friendly)
def deploy_bundle(c, host=None, bundle=None, dry_run=False, yes=False, project_root=None,
                  trust_host=False, non_interactive=None, json=False):
    """Deploy a bundle: upload only what changed, apply it with a backup first."""
    from remoteops.laptop.entry import deploy_and_print

    settings = _settings(project_root=project_root, non_interactive=non_interactive)
    confirm = None if dry_run else _confirm(settings, yes, non_interactive, "Apply this deploy")
    deploy_and_print(settings, host, bundle, dry_run, confirm, trust_host, json)


@task(help={"backup": "the backup to restore (a name from 'invoke backups', or its path); "
            "several hosts: HOST=NAME,HOST=NAME; or vN: bundle version N on every host",
            "host": HOSTS_HELP, "dry-run": "show what would change; change nothing",
            "yes": "do not ask for confirmation", "project-root": "the project's folder on the "
            "target", "trust-host": "record an unknown host key", "non-interactive": "never "
            "prompt", "json": "print JSON"})
@fan_out("rollback", friendly)
def rollback(c, backup, host=None, dry_run=False, yes=False, project_root=None,
             trust_host=False, non_interactive=None, json=False):
    """Put the project on the server back exactly as a backup recorded it."""
    from remoteops.laptop.deploy import rollback as roll_back
    from remoteops.laptop.render import print_rollback
    from remoteops.laptop.targets import open_target

    settings = _settings(project_root=project_root, non_interactive=non_interactive)
    confirm = None if dry_run else _confirm(settings, yes, non_interactive, "Roll back")
    with open_target(settings, host, trust_host=trust_host) as target:
        print_rollback(roll_back(settings, target, backup, dry_run, confirm), json)


@task(help={"host": HOSTS_HELP, "project-root": "the project's folder on the target",
            "trust-host": "record an unknown host key", "json": "print JSON"})
@fan_out("backups", friendly)
def backups(c, host=None, project_root=None, trust_host=False, json=False):
    """List the backups on the server (which one is current, files, size)."""
    from remoteops.laptop.deploy import list_backups
    from remoteops.laptop.render import print_backups
    from remoteops.laptop.targets import open_target

    settings = _settings(project_root=project_root)
    with open_target(settings, host, trust_host=trust_host) as target:
        print_backups(target.describe(), list_backups(target), json)


def _target_factory(settings, host, trust_host):
    from remoteops.laptop.targets import open_target

    return lambda: open_target(settings, host, trust_host=trust_host)


@task(optional=["resume"],
      help={"host": HOSTS_HELP, "skip-sample": "skip the sample smoke-test stage "
            "(env TRAIN_SYNC_SKIP_SAMPLE)", "stages": "comma-separated stages to run, e.g. style",
            "resume": "continue a run (the latest, or RUN_ID) from its first unfinished stage",
            "project-root": "the project's folder on the server (env TRAIN_SYNC_PROJECT_ROOT)",
            "non-interactive": "never prompt (env TRAIN_SYNC_NON_INTERACTIVE)",
            "yes": "do not ask for confirmation (env TRAIN_SYNC_ASSUME_YES)",
            "gpu-gate": "strict, warn or off for the precheck stage",
            "detach": "return as soon as the run has started",
            "no-deploy": "do not deploy the local tree first",
            "trust-host": "record an unknown host key", "json": "print the final status as JSON"})
@fan_out("remote-train", friendly)
def remote_train(c, host=None, skip_sample=False, stages=None, resume=None, project_root=None,
                 non_interactive=False, yes=False, gpu_gate=None, detach=False, no_deploy=False,
                 trust_host=False, json=False):
    """Run the training pipeline on the server (precheck, sample, style, writing, all, collect)."""
    from remoteops.laptop.remote_train_cli import run_remote_train

    settings = _settings(project_root=project_root, gpu_gate=gpu_gate,
                         non_interactive=True if non_interactive else None,
                         assume_yes=True if yes else None, skip_sample=True if skip_sample else None)
    code = run_remote_train(settings, _target_factory(settings, host, trust_host),
                            stages=[s.strip() for s in stages.split(",")] if stages else None,
                            resume=resume, detach=detach, deploy=not no_deploy, as_json=json,
                            confirm=_confirm(settings, yes, non_interactive, "Start training"))
    if code:
        raise Exit(code=code)


@task(help={"host": HOST_HELP, "from-laptop": "upload this laptop's copy instead (only "
            "missing or different files, resumable, sha256-verified on the server): for a "
            "server that reaches no hub", "source": "the folder to upload (default: "
            "train.base_model's folder, or this laptop's Hugging Face / ModelScope cache)",
            "project-root": "the project's folder on the server", "trust-host": "record an "
            "unknown host key", "json": "print JSON"})
@friendly
def fetch_model(c, host=None, from_laptop=False, source=None, project_root=None,
                trust_host=False, json=False):
    """Put train.base_model on the server: download it there (a hub id), or --from-laptop."""
    from remoteops.laptop.fetch_model import describe, fetch_model as fetch
    from remoteops.laptop.render import print_json, upload_progress

    settings = _settings(project_root=project_root)
    with _target_factory(settings, host, trust_host)() as target, \
            upload_progress(quiet=json) as progress:
        result = fetch(settings, target, from_laptop, source, progress,
                       None if json else functools.partial(print, flush=True))
    print_json(result) if json else print(describe(result))


@task(help={"run": "run id (default: the latest)", "host": HOSTS_HELP,
            "project-root": "the project's folder on the server", "json": "print JSON",
            "trust-host": "record an unknown host key"})
@fan_out("status", friendly)
def status(c, run=None, host=None, project_root=None, json=False, trust_host=False):
    """Show a run's stages, progress and last log lines (one SSH command)."""
    from remoteops.laptop.remote_train import status as get_status
    from remoteops.laptop.remote_train_cli import print_status

    settings = _settings(project_root=project_root)
    with _target_factory(settings, host, trust_host)() as target:
        data = get_status(target, run)
    print_status(data, json)
    if data["status"] in ("failed", "dead"):
        raise Exit(code=1)


@task(help={"run": "run id (default: the latest)", "stage": "a stage's log (default: the "
            "runner's)", "follow": "keep printing new lines until the run ends", "host": HOST_HELP,
            "lines": "how many lines to show first", "project-root": "the project's folder on "
            "the server", "trust-host": "record an unknown host key"})
@friendly
def logs(c, run=None, stage=None, follow=False, host=None, lines=50, project_root=None,
         trust_host=False):
    """Print a run's log (the runner's, or one stage's); -f follows it."""
    from remoteops.laptop.remote_train_cli import stream_logs

    settings = _settings(project_root=project_root)
    stream_logs(_target_factory(settings, host, trust_host), run, stage, follow, lines)


@task(help={"run": "run id (default: the latest)", "host": HOSTS_HELP,
            "project-root": "the project's folder on the server", "trust-host": "record an "
            "unknown host key", "json": "print JSON"})
@fan_out("cancel", friendly)
def cancel(c, run=None, host=None, project_root=None, trust_host=False, json=False):
    """Stop a run and its processes cleanly and mark it cancelled."""
    from remoteops.laptop.render import print_json

    settings = _settings(project_root=project_root)
    with _target_factory(settings, host, trust_host)() as target:
        args = ["pipeline-cancel", "--root", target.project_root] + (["--run", run] if run else [])
        data = target.run_agent(*args, timeout=120)
    if json:
        print_json(data)
    else:
        print(f"{data['run_id']}: {data['status']} (was {data['was']})")


@task(help={"host": HOSTS_HELP, "project-root": "the project's folder on the server",
            "trust-host": "record an unknown host key", "json": "print JSON"})
@fan_out("runs", friendly)
def runs(c, host=None, project_root=None, trust_host=False, json=False):
    """List the pipeline runs: id, start, stages and states, duration, best eval loss."""
    from remoteops.laptop.remote_train_cli import print_runs

    settings = _settings(project_root=project_root)
    with _target_factory(settings, host, trust_host)() as target:
        data = target.run_agent("pipeline-runs", "--root", target.project_root)["runs"]
    print_runs(data, json)


@task(help={"run": "run id (default: the latest)", "host": HOSTS_HELP,
            "since": "only files changed in the last N minutes (or 90s, 2h, 1d, or since "
            "a time like 2026-11-26T14:00), by the server's clock", "project-root": "the "
            "project's folder on the server", "trust-host": "record an unknown host key",
            "json": "print JSON"})
@fan_out("collect", friendly)
def collect(c, run=None, host=None, since=None, project_root=None, trust_host=False,
            json=False):
    """Bring a run's adapters, logs, metrics and reports back to outputs/ (resumable)."""
    from remoteops.laptop.collect import parse_since
    from remoteops.laptop.remote_train import collect_and_report
    from remoteops.laptop.remote_train_cli import download_progress, print_collected

    settings = _settings(project_root=project_root)
    cutoff = parse_since(since)  # judged by the server's clock
    with _target_factory(settings, host, trust_host)() as target:
        data = collect_and_report(settings, target, run, download_progress(json), cutoff)
    print_collected(data, json)


@task(help={"host": HOST_HELP, "watch": "keep running: send new samples as they appear "
            "(Ctrl-C or SIGTERM stops it between batches)", "stage": "sync into this stage's "
            "dataset_live folder instead of [sync] dest", "status": "show local count, server "
            "count, lag and the last error; send nothing", "done": "send what is left, then "
            "mark the dataset complete (the trainer stops waiting for more)", "source": "the "
            "local folder or .jsonl file (default: [sync] source)", "format": "dirs, files or "
            "jsonl (default: [sync] format)", "project-root": "the project's folder on the "
            "server", "trust-host": "record an unknown host key", "json": "print JSON"})
@friendly
def sync_data(c, host=None, watch=False, stage=None, status=False, done=False, source=None,
              format=None, project_root=None, trust_host=False, json=False):
    """Push new samples to the server's live dataset: complete ones only, exactly once."""
    from remoteops.laptop import sync_data as sync
    from remoteops.laptop.render import print_json
    from remoteops.laptop.sync_report import describe_round, describe_status

    settings = _settings(project_root=project_root)
    plan = sync.plan_from(settings, stage, source, format)
    say = None if json else functools.partial(print, flush=True)
    with _target_factory(settings, host, trust_host)() as target:
        if status:
            data = sync.sync_status(settings, target, plan)
        elif done:
            data = sync.mark_done(settings, target, plan, say)
        else:
            data = sync.sync_data(settings, target, plan, watch=watch, say=say)
    if json:
        print_json(data if isinstance(data, dict) else vars(data))
    elif status:
        print(describe_status(data))
    elif done:
        print(f"{plan.dest}: marked complete with {data['samples']} sample(s)")
    else:
        print(describe_round(data, watch))


def make_namespace() -> Collection:
    """A fresh collection of every remoteops task (add your own tasks to it freely)."""
    from remoteops.laptop.kept_tasks import connections
    from remoteops.laptop.serve_tasks import chat, serve

    ns = Collection()
    for t in (precheck, config, plugins, install_plugin, uninstall_plugin, init, build_bundle,
              deploy_bundle, rollback, backups, fetch_model, remote_train, status, logs, cancel,
              runs, collect, serve, chat, sync_data, connections):
        ns.add_task(t)
    return ns


ns = make_namespace()

__all__ = ["make_namespace", "ns", "friendly"]
