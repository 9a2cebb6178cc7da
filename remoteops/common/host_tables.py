"""The settings that name several hosts: ``[groups.NAME]`` and ``[hosts.NAME.overrides]``.

A group is a list of hosts that ``--host @NAME`` stands for::

    [groups.gpus]
    hosts = ["gpu1", "gpu2", "me@10.0.0.7:2222"]

A host's overrides are settings that apply only to the runs started on it (a learning-rate
sweep, a smaller batch on a smaller card)::

    [hosts.gpu2.overrides]
    train.lr = 2e-4

They take any setting of the tables that shape a run (``train``, ``health``, ``eval``,
``pipeline``, ``precheck``, ``gpu_gate``, ...), not connection or host settings; each value
is checked as the setting itself would be. Pure data, both sides may import it.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from remoteops.common.errors import ConfigError, close_match

Locate = Callable[[str], str]

# A group's name, as written after @ on the command line.
GROUP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Settings no host may override: where and how to connect, and the host tables themselves.
NOT_OVERRIDABLE = ("hosts", "groups", "plugins", "stages", "ssh", "default_host", "project_root",
                   "remote_python", "project_name", "plugins_dir", "bundle", "deploy")


def check_group(name: str, entry: Any, locate: Locate) -> None:
    """``[groups.NAME] hosts = [...]``: a non-empty list of plain host names."""
    where = locate(f"groups.{name}")
    example = f"[groups.{name}] hosts = [\"gpu1\", \"gpu2\"]"
    if not GROUP_NAME.fullmatch(name):
        raise ConfigError(f"{where}: group name {name!r} must be letters, digits, _ . - (it is "
                          f"written @NAME after --host); rename it there.")
    if not isinstance(entry, dict) or set(entry) - {"hosts", "description"}:
        extra = sorted(set(entry) - {"hosts", "description"}) if isinstance(entry, dict) else []
        what = f"has unknown key(s) {', '.join(extra)}" if extra else "must be a table"
        raise ConfigError(f"{where}: 'groups.{name}' {what}; write {example}.")
    hosts = entry.get("hosts")
    if not isinstance(hosts, list) or not hosts or not all(
            isinstance(h, str) and h.strip() for h in hosts):
        raise ConfigError(f"{locate(f'groups.{name}.hosts')}: 'groups.{name}.hosts' must be a "
                          f"non-empty list of host names; write {example}.")
    for host in hosts:
        if "," in host or host.strip().startswith("@") or host.strip() == "local":
            raise ConfigError(f"{locate(f'groups.{name}.hosts')}: 'groups.{name}.hosts' holds "
                              f"{host!r}; list plain hosts (a [hosts] name, an ssh alias or "
                              "user@host:port), not groups, commas or local.")


def flat_overrides(table: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flat_overrides(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_overrides(host: str, table: Any, defaults: dict, rules: dict,
                    check_value: Callable, locate: Locate) -> None:
    """Every key of ``[hosts.HOST.overrides]`` is a setting a run reads, with a valid value
    (``rules``/``check_value``: the schema's own, passed in to keep this module standalone)."""
    base = f"hosts.{host}.overrides"
    if not isinstance(table, dict):
        raise ConfigError(f"{locate(base)}: '{base}' must be a table, e.g. [{base}] "
                          "train.lr = 2e-4.")
    for dotted, value in flat_overrides(table).items():
        where = locate(f"{base}.{dotted}")
        parts = dotted.split(".")
        if parts[0] in NOT_OVERRIDABLE:
            raise ConfigError(f"{where}: '{base}.{dotted}' cannot be set per host; overrides "
                              f"take run settings such as train.lr or pipeline.max_retries "
                              f"(set {parts[0]} in [hosts.{host}] or the project file).")
        node: Any = defaults
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = list(node) if isinstance(node, dict) else []
                hint = close_match(part, known)
                near = ".".join(parts[:i] + [hint[0]]) if hint else ""
                extra = f" Did you mean '{near}'?" if near else ""
                raise ConfigError(f"{where}: unknown setting '{dotted}' in '{base}'.{extra} "
                                  "Run 'invoke config' to see every setting.")
            node = node[part]
        if isinstance(node, dict):
            raise ConfigError(f"{where}: '{base}.{dotted}' is a table; set its keys instead.")
        _check_type(f"{base}.{dotted}", value, node, where)
        if isinstance(node, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            _store(table, parts, value)
        elif isinstance(node, int) and not isinstance(node, bool) and isinstance(value, float):
            value = int(value)
            _store(table, parts, value)
        rule = rules.get(dotted)
        if rule is not None:
            check_value(f"{base}.{dotted}", value, rule, where, node)


def _check_type(dotted: str, value: Any, default: Any, where: str) -> None:
    number = isinstance(default, (int, float)) and not isinstance(default, bool)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if number else \
        isinstance(value, type(default))
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
        ok = value.is_integer()
    if not ok:
        kind = {bool: "true or false", str: "a string", list: "a list"}.get(
            type(default), "a number")
        raise ConfigError(f"{where}: '{dotted}' is {value!r}; it must be {kind} like the "
                          f"setting it overrides (default {default!r}). Fix it there.")


def _store(table: dict, parts: list[str], value: Any) -> None:
    """Write a coerced value back where it was, dotted key or nested table alike."""
    if ".".join(parts) in table:
        table[".".join(parts)] = value
        return
    node = table
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


__all__ = ["GROUP_NAME", "NOT_OVERRIDABLE", "check_group", "check_overrides", "flat_overrides"]
