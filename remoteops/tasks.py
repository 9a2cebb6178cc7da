"""The laptop-side commands as an invoke ``Collection``.

A training project gets every task with a two-line ``tasks.py``::

    from remoteops.tasks import make_namespace
    ns = make_namespace()

and the ``remoteops`` console script runs the same tasks with no tasks.py.
Each task parses its flags, makes one library call and prints the result.
"""

from __future__ import annotations

import functools
import os
import traceback
from pathlib import Path
from typing import Any, Callable

from invoke import Collection, task
from invoke.exceptions import Exit

from remoteops.errors import RemoteOpsError

HOST_HELP = "local, a [hosts] name from remoteops.toml, an ~/.ssh/config alias, or user@host:port"


def friendly(func: Callable) -> Callable:
    """Print a RemoteOpsError as one line and exit non-zero (REMOTEOPS_DEBUG=1: traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RemoteOpsError as exc:
            if os.environ.get("REMOTEOPS_DEBUG"):
                traceback.print_exc()
            raise Exit(f"error: {exc}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None

    return wrapper


def _settings(**flags: Any):
    from remoteops.config import load_settings

    return load_settings(flags=flags)


@task(help={"host": HOST_HELP,
            "gpu-gate": "strict (driver problem fails), warn (it warns), or off",
            "project-root": "the project's folder on the target (env TRAIN_SYNC_PROJECT_ROOT)",
            "trust-host": "record an unknown host key in .remoteops/known_hosts (accept-new)",
            "json": "print JSON instead of a table"})
@friendly
def precheck(c, host=None, gpu_gate=None, project_root=None, trust_host=False, json=False):
    """Check the server is ready to train (Python, packages, GPU gate, disk, RAM, data)."""
    from remoteops.precheck import run_precheck
    from remoteops.render import print_checks
    from remoteops.targets import open_target

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
    from remoteops.render import print_settings

    settings = _settings()
    print_settings(settings.items(), settings.files, json)


@task(help={"json": "print JSON"})
@friendly
def plugins(c, json=False):
    """List the loaded plugins: name, version, source, hooks."""
    from remoteops.plugins import get_plugin_manager
    from remoteops.render import print_plugins

    settings = _settings()
    print_plugins(get_plugin_manager(settings.project_dir, settings["plugins_dir"]).infos(), json)


@task(help={"spec": "a pip requirement (name, name==1.0) or a path to a plugin project",
            "upgrade": "upgrade it if already installed", "editable": "install a path editable"})
@friendly
def install_plugin(c, spec, upgrade=False, editable=False):
    """Install a plugin package into remoteops' own Python environment."""
    from remoteops.plugin_install import install_plugin as install

    for line in install(spec, upgrade=upgrade, editable=editable):
        print(line)


@task(help={"name": "the distribution name of the plugin package"})
@friendly
def uninstall_plugin(c, name):
    """Uninstall a plugin package from remoteops' own Python environment."""
    from remoteops.plugin_install import uninstall_plugin as uninstall

    print(uninstall(name))


@task(help={"path": "the project folder (default: here)",
            "force": "overwrite remoteops.toml / tasks.py if they exist"})
@friendly
def init(c, path=".", force=False):
    """Write a starter remoteops.toml and a two-line tasks.py into a project."""
    from remoteops.scaffold import init_project

    for line in init_project(Path(path), force=force):
        print(line)


def make_namespace() -> Collection:
    """A fresh collection of every remoteops task (add your own tasks to it freely)."""
    ns = Collection()
    for t in (precheck, config, plugins, install_plugin, uninstall_plugin, init):
        ns.add_task(t)
    return ns


ns = make_namespace()

__all__ = ["make_namespace", "ns", "friendly"]
