"""Layered settings: defaults < user file < project file < environment < flags.

Every value remembers where it came from, so ``invoke config`` can say so.
Files are TOML: the user file (``~/.config/remoteops/config.toml`` or
``$REMOTEOPS_USER_CONFIG``) and the project's ``remoteops.toml`` (or the
``[tool.remoteops]`` table of its ``pyproject.toml``). Environment variables
are ``REMOTEOPS_<KEY>`` with ``__`` between nested keys
(``REMOTEOPS_PRECHECK__MIN_DISK_GB=5``) plus the seed project's
``TRAIN_SYNC_*`` names. Login passwords are refused wherever they appear: use
a key or ssh-agent. Any other key whose name says it holds a secret
(``db_password``, ``hf_token``, ``aws_secret_access_key``, ...; see
``remoteops.common.secret_rules``) must be a reference, ``{"$env" = "NAME"}``, which is
resolved only where it is used and printed as ``$env:NAME``. Values are checked
against ``remoteops.common.config_schema``; every error names ``file:line`` (or the
environment variable or flag) and what to write instead.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from remoteops.common.config_schema import find_line, split_key, validate
from remoteops.common.errors import ConfigError, close_match
from remoteops.common.secret_rules import is_ref, is_secret_key, mask, refuse_secret
from remoteops.common.defaults import EVAL_DEFAULTS, HEALTH_DEFAULTS, TRAIN_DEFAULTS

PROJECT_FILE = "remoteops.toml"
GPU_GATE_LEVELS = ("strict", "warn", "off")

# Values of these tables are free-form (names the user chooses).
OPEN_TABLES = ("hosts", "stages", "plugins", "groups")

DEFAULTS: dict[str, Any] = {
    "project_name": "",  # empty: the project folder's name
    "project_root": "",  # on the target; empty: the project folder (local) or ~/<project_name>
    "default_host": "local",
    "remote_python": "python3",
    "gpu_gate": "strict",
    "non_interactive": False,
    "assume_yes": False,
    "skip_sample": False,
    "plugins_dir": "plugins",
    "datasets": [],
    "ssh": {
        "config_file": "~/.ssh/config",
        "known_hosts": "~/.ssh/known_hosts",
        "project_known_hosts": ".remoteops/known_hosts",
        "connect_timeout": 10.0,
        "keepalive": 15,
        "connect_retries": 2,
        "retry_backoff": 1.0,
        "command_timeout": 300.0,
        "client": "paramiko",  # or auto, openssh; by default a whole-bundle deploy uses ssh
        "persist": 600.0,  # seconds a kept connection waits for the next deploy; 0: none
    },
    "precheck": {
        "min_python": "3.10",
        "required_packages": ["torch", "transformers", "peft"],
        "optional_packages": ["bitsandbytes", "accelerate"],
        "min_disk_gb": 20.0,
        "min_ram_gb": 8.0,
        "min_vram_gb": 0.0,
    },
    "bundle": {
        "include": [],  # gitignore-style patterns; empty: every file not excluded
        "exclude": [],
        "include_secrets": [],  # secret files (keys, .env, ...) to ship anyway, by path
        "out_dir": "bundles",
        "compression_level": 3,
    },
    "deploy": {
        "keep_backups": 10,
    },
    "pipeline": {
        "stages": ["precheck", "sample", "style", "writing", "all", "collect"],
        "max_retries": 2,  # process died / CUDA error: retries from the latest checkpoint
        "oom_retries": 1,  # out of memory: retries with half the batch, double accumulation
        "heartbeat_seconds": 2.0,
        "poll_seconds": 1.0,
        "stop_grace_seconds": 10.0,  # a stopped stage's processes: SIGTERM, then SIGKILL after
        "deploy": True,  # remote-train deploys first when the local tree differs
    },
    "sync": {  # sync-data: samples from the laptop to a live dataset on the server
        "source": "",            # local folder (dirs, files) or JSONL file
        "dest": "data/live",     # on the server, relative to the project root
        "format": "dirs",        # dirs | files | jsonl
        "poll_seconds": 2.0,     # --watch: how often to look for new samples
        "settle_seconds": 1.0,   # unchanged this long (size, mtime) before a sample is sent
        "batch_max": 200,        # samples per upload (one tar, one agent call)
    },
    "slurm": {  # executor = "slurm": sbatch options of every Slurm stage ([stages.X.slurm] wins)
        "partition": "", "account": "", "gres": "", "time": "", "cpus": 0, "mem": "",
        "extra": [],            # more sbatch options, one each: ["--qos=high"]
        "poll_seconds": 1.0,    # how often the runner asks squeue (one call for the run)
        "chain": "upfront",     # consecutive Slurm stages submitted at once ("stage": one by one)
    },
    "train": TRAIN_DEFAULTS,
    "health": HEALTH_DEFAULTS,
    "eval": EVAL_DEFAULTS,
    "hosts": {},
    "groups": {},  # [groups.NAME] hosts = [...]: --host @NAME (common/host_tables)
    "stages": {},
    "plugins": {},
}

# Keys of a [hosts.NAME] entry.

SEED_ENV = {
    "TRAIN_SYNC_PROJECT_ROOT": "project_root",
    "TRAIN_SYNC_NON_INTERACTIVE": "non_interactive",
    "TRAIN_SYNC_ASSUME_YES": "assume_yes",
    "TRAIN_SYNC_SKIP_SAMPLE": "skip_sample",
}
# REMOTEOPS_* variables that configure the tool itself, not settings.
ENV_NOT_SETTINGS = {"REMOTEOPS_USER_CONFIG", "REMOTEOPS_BLOCK_PLUGINS", "REMOTEOPS_TRACE_HOOKS",
                    "REMOTEOPS_DEBUG", "REMOTEOPS_PROJECT_DIR", "REMOTEOPS_NO_ENTRYPOINTS",
                    # what the runner tells a command stage (remoteops.hooks reads them)
                    "REMOTEOPS_RUN_DIR", "REMOTEOPS_STAGE", "REMOTEOPS_PROJECT_ROOT"}


_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}


@dataclass
class Settings:
    """The effective settings plus where each leaf value came from."""

    values: dict[str, Any]
    sources: dict[str, str]
    project_dir: Path
    files: list[str] = field(default_factory=list)

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.values
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def __getitem__(self, dotted: str) -> Any:
        sentinel = object()
        value = self.get(dotted, sentinel)
        if value is sentinel:
            raise KeyError(dotted)
        return value

    def source(self, dotted: str) -> str:
        return self.sources.get(dotted, "default")

    @property
    def project_name(self) -> str:
        return self.values["project_name"] or self.project_dir.name

    def items(self) -> Iterator[tuple[str, Any, str]]:
        """Every leaf setting as (dotted key, value, source), secrets masked."""
        for key, value in _flatten(self.values):
            yield key, mask(key, value), self.source(key)

    def snapshot(self) -> dict[str, Any]:
        """What rebuilds these settings in another process (``from_snapshot``). Secrets
        are ``$env`` references, never values, so a snapshot holds none."""
        return {"values": self.values, "sources": self.sources,
                "project_dir": str(self.project_dir), "files": list(self.files)}

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> "Settings":
        return cls(copy.deepcopy(dict(data["values"])), dict(data["sources"]),
                   Path(data["project_dir"]), list(data.get("files") or []))

    def to_json(self) -> str:
        return json.dumps({k: {"value": v, "source": s} for k, v, s in self.items()},
                          indent=2, default=str)


class _Where:
    """Where each leaf setting was written, for messages: ``file:line``, ``env NAME``, ``flag``."""

    def __init__(self) -> None:
        self.origin: dict[str, tuple] = {}   # dotted -> ("file", path, prefix) | ("label", text)
        self.texts: dict[str, str] = {}

    def file(self, path: Path, text: str, prefix: list[str] | None = None) -> Callable:
        self.texts[str(path)] = text
        return lambda dotted, src: ("file", str(path), prefix or [])

    def __call__(self, dotted: str) -> str:
        found = self.origin.get(dotted) or next(
            (o for k, o in self.origin.items() if k.startswith(dotted + ".")), None)
        if found is None:
            return "the settings"
        if found[0] == "label":
            return found[1]
        return self.at(found, dotted)

    def at(self, origin: tuple, dotted: str) -> str:
        if origin[0] == "label":
            return origin[1]
        _, path, prefix = origin
        line = find_line(self.texts.get(path, ""), prefix + split_key(dotted))
        return f"{path}:{line}" if line else path


def load_settings(project_dir: str | os.PathLike | None = None,
                  flags: Mapping[str, Any] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Merge every layer for the project in ``project_dir`` (default: cwd)."""
    env = os.environ if env is None else env
    project = Path(project_dir or env.get("REMOTEOPS_PROJECT_DIR") or os.getcwd()).resolve()
    values = copy.deepcopy(DEFAULTS)
    sources: dict[str, str] = {}
    files: list[str] = []
    where = _Where()

    user_file = Path(env.get("REMOTEOPS_USER_CONFIG")
                     or Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
                     / "remoteops" / "config.toml").expanduser()
    if user_file.is_file():
        data, text = _read_toml(user_file)
        _merge(values, sources, data, f"user file {user_file}", where.file(user_file, text),
               where)
        files.append(str(user_file))

    project_file = project / PROJECT_FILE
    pyproject = project / "pyproject.toml"
    if project_file.is_file():
        data, text = _read_toml(project_file)
        _merge(values, sources, data, f"project {PROJECT_FILE}", where.file(project_file, text),
               where)
        files.append(str(project_file))
    elif pyproject.is_file():
        data, text = _read_toml(pyproject)
        table = data.get("tool", {}).get("remoteops")
        if table:
            _merge(values, sources, table, "project pyproject.toml [tool.remoteops]",
                   where.file(pyproject, text, ["tool", "remoteops"]), where)
            files.append(str(pyproject))

    _merge(values, sources, _from_env(env), None, lambda dotted, src: ("label", src), where)
    if flags:
        _merge(values, sources, _unflatten({k: v for k, v in flags.items() if v is not None}),
               "flag", lambda dotted, src: ("label", f"flag for {dotted}"), where)
    validate(values, DEFAULTS, where)
    return Settings(values, sources, project, files)


def _read_toml(path: Path) -> tuple[dict, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8.") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        where = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        problem = re.sub(r"\s*\(at line.*\)$", "", msg) or "invalid TOML"
        loc = f"line {where.group(1)}, column {where.group(2)}" if where else "somewhere"
        raise ConfigError(f"{path}: {loc}: {problem}; fix the TOML syntax there.") from None


def _merge(values: dict, sources: dict, layer: Mapping, label: str | None,
           origin_of: Callable[[str, str | None], tuple], where: _Where, prefix: str = "",
           secret: bool = False) -> None:
    """Merge ``layer`` into ``values``; ``label`` None means each leaf is (value, label).

    ``secret``: the layer is the value of a secret-looking key, so every leaf must be a
    ``$env`` reference.
    """
    for key, raw in layer.items():
        dotted = f"{prefix}{key}"
        if isinstance(raw, Mapping):
            value, src = raw, label or "environment"
        else:
            value, src = (raw if label is None else (raw, label))
        origin = origin_of(dotted, src)
        top = dotted.split(".")[0]
        # hosts.NAME, stages.NAME, plugins.NAME are names the user chose, not what they hold
        named = top in OPEN_TABLES and dotted.count(".") == 1
        # remoteops' own settings are not secrets whatever their names (include_secrets)
        own = top not in OPEN_TABLES and key in values
        secret_here = secret or (is_secret_key(str(key)) and not named and not own)
        refuse_secret(dotted, value, secret_here, where.at(origin, dotted))
        if isinstance(raw, Mapping) and not is_ref(raw):
            node = values.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where.at(origin, dotted)}: '{dotted}' must be a single value, "
                                  "not a table.")
            _merge(node, sources, raw, label, origin_of, where, dotted + ".", secret_here)
            continue
        if top not in OPEN_TABLES and key not in values:
            choices = [k for k in values]
            hint = close_match(key, choices)
            suggestion = f" Did you mean '{prefix}{hint[0]}'?" if hint else ""
            raise ConfigError(f"{where.at(origin, dotted)}: unknown setting '{dotted}'."
                              f"{suggestion} Run 'invoke config' to see every setting.")
        if isinstance(values.get(key), dict):
            raise ConfigError(f"{where.at(origin, dotted)}: '{dotted}' is a table; set its keys "
                              "instead.")
        values[key] = _coerce(dotted, value, values.get(key), where.at(origin, dotted))
        sources[dotted] = src
        where.origin[dotted] = origin


def _coerce(dotted: str, value: Any, default: Any, origin: str) -> Any:
    if default is None or isinstance(value, type(default)) and not (
            isinstance(default, (int, float)) and not isinstance(default, bool)
            and isinstance(value, bool)):
        return float(value) if isinstance(default, float) and isinstance(value, int) else value
    if isinstance(default, bool) and isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    elif isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(
            value, (bool, list, dict)):
        try:
            number = type(default)(value)
            if isinstance(value, float) and isinstance(default, int) and number != value:
                raise ValueError(value)  # 2.5 for a count is a mistake, not a 2
            return number
        except (TypeError, ValueError):
            pass
    elif isinstance(default, list) and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
            "list": "a list"}.get(type(default).__name__, type(default).__name__)
    raise ConfigError(f"{origin}: '{dotted}' must be {kind}, got {value!r} (the default is "
                      f"{default!r}); fix it there.")


def _from_env(env: Mapping[str, str]) -> dict:
    """Environment layer as a nested dict whose leaves are (value, source)."""
    out: dict = {}
    for name, value in sorted(env.items()):
        if name in SEED_ENV:
            dotted = SEED_ENV[name]
        elif (name.startswith("REMOTEOPS_") and name not in ENV_NOT_SETTINGS
              and not name.startswith("REMOTEOPS_TEST_")):
            dotted = name[len("REMOTEOPS_"):].lower().replace("__", ".")
        else:
            continue
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = (value, f"env {name}")
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _flatten(d: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in d.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and not is_ref(value):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


