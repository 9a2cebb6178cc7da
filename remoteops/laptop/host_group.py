"""Which hosts ``--host`` names: one, a list (``a,b,c``) or a group (``@gpus``), mixed freely.

``[groups.NAME] hosts = [...]`` (checked in ``common/host_tables``) is what ``@NAME``
stands for. ``fan_out`` wraps a task: with one host it runs the task as it always did;
with several it hands the call to ``multi_host_tasks`` (or ``multi_train``), which works
on every host in parallel and fails once at the end, naming the hosts that failed.
Per-host settings (``[hosts.NAME.overrides]``) are applied by ``settings_for``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
from typing import Any, Callable

from remoteops.common.config import Settings
from remoteops.common.errors import ConfigError
from remoteops.common.host_tables import flat_overrides

# The commands that take several hosts (the README and --help list the same).
SEVERAL = ("precheck", "deploy-bundle", "rollback", "backups", "status", "runs", "cancel",
           "collect", "remote-train")


def names_several(spec: str | None) -> bool:
    """Does this --host text name more than one host (or a group)?"""
    return bool(spec) and ("," in spec or spec.strip().startswith("@"))


def expand(settings: Settings, spec: str | None) -> list[str]:
    """The hosts ``spec`` names, in order, each once (``a,@gpus,c``)."""
    spec = (spec or settings["default_host"] or "local").strip()
    groups = settings["groups"]
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise ConfigError(f"--host {spec!r} has an empty name; write hosts as a,b,c.")
        if part.startswith("@"):
            name = part[1:]
            if name not in groups:
                known = ", ".join("@" + g for g in groups) or "none yet"
                raise ConfigError(f"--host names group {part}, which remoteops.toml does not "
                                  f"define (groups: {known}); add [groups.{name or 'NAME'}] "
                                  f"hosts = [\"a\", \"b\"].")
            members = [h.strip() for h in groups[name]["hosts"]]
        else:
            members = [part]
        out += [m for m in members if m not in out]
    return out


def folder_name(host: str) -> str:
    """The local folder a host's results go to, ``outputs/<folder>/``: its name, made safe."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", host).strip("._") or "host"
    return name


def check_folders(hosts: list[str]) -> None:
    """Refuse two hosts whose results would land in the same folder."""
    seen: dict[str, str] = {}
    for host in hosts:
        folder = folder_name(host)
        if folder in seen:
            raise ConfigError(f"hosts {seen[folder]!r} and {host!r} would both collect into "
                              f"outputs/{folder}/; give one of them a [hosts] name.")
        seen[folder] = host


def overrides_for(settings: Settings, host: str) -> dict[str, Any]:
    """``[hosts.HOST.overrides]`` as dotted keys (empty when none)."""
    entry = settings["hosts"].get(host) or {}
    return flat_overrides(entry.get("overrides") or {})


def settings_for(settings: Settings, host: str) -> Settings:
    """The settings a run on ``host`` uses: the project's, with that host's overrides."""
    extra = overrides_for(settings, host)
    if not extra:
        return settings
    values = copy.deepcopy(settings.values)
    sources = dict(settings.sources)
    for dotted, value in extra.items():
        node = values
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
        sources[dotted] = f"hosts.{host}.overrides"
    return Settings(values, sources, settings.project_dir, list(settings.files))


VERSION = re.compile(r"v(\d+)")  # rollback --backup v3: the state of bundle version 3
PAIRS = re.compile(r"[^=,/]+=")  # --backup h1=NAME,h2=NAME


def _group_path(name: str, spec: str | None, kwargs: dict) -> bool:
    """Does this call go to the several-hosts version of the task?"""
    if names_several(spec):
        return True
    backup = str(kwargs.get("backup") or "")
    if name == "rollback" and (VERSION.fullmatch(backup) or PAIRS.match(backup)):
        return True  # a version is looked up on each host; HOST=NAME pairs name the hosts
    if spec is not None and name != "remote-train":
        return False  # one host named: no need to read the settings here
    from remoteops.common.config import load_settings

    settings = load_settings()
    hosts = expand(settings, spec)
    # default_host may be a group; a host's overrides go with its run
    return len(hosts) > 1 or name == "remote-train" and bool(overrides_for(settings, hosts[0]))


def fan_out(name: str, outer: Callable = lambda f: f) -> Callable:
    """Decorate the task ``name``: several hosts go to the multi-host version of it.
    ``outer`` wraps the result (tasks.py passes ``friendly``: one-line errors for both)."""

    def wrap(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(c, *args: Any, **kwargs: Any) -> Any:
            if args:  # invoke hands positional arguments (rollback's backup) by position
                names = list(inspect.signature(func).parameters)[1:]
                kwargs.update(zip(names, args))
            if not _group_path(name, kwargs.get("host"), kwargs):
                return func(c, **kwargs)
            if name == "remote-train":
                from remoteops.laptop.multi_train import remote_train

                return remote_train(**kwargs)
            from remoteops.laptop import multi_host_tasks

            return getattr(multi_host_tasks, name.replace("-", "_"))(**kwargs)

        return outer(wrapper)

    return wrap


__all__ = ["SEVERAL", "expand", "names_several", "folder_name", "check_folders",
           "overrides_for", "settings_for", "fan_out"]
