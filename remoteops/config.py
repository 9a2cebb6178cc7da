"""Layered settings: defaults < user file < project file < environment < flags.

Every value remembers where it came from, so ``invoke config`` can say so.
Files are TOML: the user file (``~/.config/remoteops/config.toml`` or
``$REMOTEOPS_USER_CONFIG``) and the project's ``remoteops.toml`` (or the
``[tool.remoteops]`` table of its ``pyproject.toml``). Environment variables
are ``REMOTEOPS_<KEY>`` with ``__`` between nested keys
(``REMOTEOPS_PRECHECK__MIN_DISK_GB=5``) plus the seed project's
``TRAIN_SYNC_*`` names. Passwords are refused wherever they appear: use a key
or ssh-agent; other secrets are referenced as ``{"$env": "NAME"}``.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from remoteops.errors import ConfigError
from remoteops.trainer.defaults import EVAL_DEFAULTS, HEALTH_DEFAULTS, TRAIN_DEFAULTS

PROJECT_FILE = "remoteops.toml"
GPU_GATE_LEVELS = ("strict", "warn", "off")

# Values of these tables are free-form (names the user chooses).
OPEN_TABLES = ("hosts", "stages", "plugins")

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
        "out_dir": "bundles",
        "compression_level": 3,
    },
    "deploy": {
        "keep_backups": 10,
        "verify_after": True,
    },
    "pipeline": {
        "stages": ["precheck", "sample", "style", "writing", "all", "collect"],
        "max_retries": 2,  # process died / CUDA error: retries from the latest checkpoint
        "oom_retries": 1,  # out of memory: retries with half the batch, double accumulation
        "heartbeat_seconds": 2.0,
        "poll_seconds": 1.0,
        "deploy": True,  # remote-train deploys first when the local tree differs
    },
    "train": TRAIN_DEFAULTS,
    "health": HEALTH_DEFAULTS,
    "eval": EVAL_DEFAULTS,
    "hosts": {},
    "stages": {},
    "plugins": {},
}

# Keys of a [hosts.NAME] entry.
HOST_KEYS = ("host", "hostname", "port", "user", "identity_file", "proxy_jump",
             "project_root", "remote_python", "passphrase")

SEED_ENV = {
    "TRAIN_SYNC_PROJECT_ROOT": "project_root",
    "TRAIN_SYNC_NON_INTERACTIVE": "non_interactive",
    "TRAIN_SYNC_ASSUME_YES": "assume_yes",
    "TRAIN_SYNC_SKIP_SAMPLE": "skip_sample",
}
# REMOTEOPS_* variables that configure the tool itself, not settings.
ENV_NOT_SETTINGS = {"REMOTEOPS_USER_CONFIG", "REMOTEOPS_BLOCK_PLUGINS", "REMOTEOPS_TRACE_HOOKS",
                    "REMOTEOPS_DEBUG", "REMOTEOPS_PROJECT_DIR", "REMOTEOPS_NO_ENTRYPOINTS"}

_PASSWORD_KEYS = re.compile(r"^(password|passwd|pass|pwd|ssh_password|sudo_password)$", re.I)
_SECRET_KEYS = re.compile(r"(passphrase|secret|token|api_key|apikey|private_key)$", re.I)

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
            yield key, _mask(key, value), self.source(key)

    def to_json(self) -> str:
        return json.dumps({k: {"value": v, "source": s} for k, v, s in self.items()},
                          indent=2, default=str)


def load_settings(project_dir: str | os.PathLike | None = None,
                  flags: Mapping[str, Any] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Merge every layer for the project in ``project_dir`` (default: cwd)."""
    env = os.environ if env is None else env
    project = Path(project_dir or env.get("REMOTEOPS_PROJECT_DIR") or os.getcwd()).resolve()
    values = copy.deepcopy(DEFAULTS)
    sources: dict[str, str] = {}
    files: list[str] = []

    user_file = Path(env.get("REMOTEOPS_USER_CONFIG")
                     or Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
                     / "remoteops" / "config.toml").expanduser()
    if user_file.is_file():
        _merge(values, sources, _read_toml(user_file), f"user file {user_file}", str(user_file))
        files.append(str(user_file))

    project_file = project / PROJECT_FILE
    pyproject = project / "pyproject.toml"
    if project_file.is_file():
        _merge(values, sources, _read_toml(project_file), f"project {PROJECT_FILE}", str(project_file))
        files.append(str(project_file))
    elif pyproject.is_file():
        table = _read_toml(pyproject).get("tool", {}).get("remoteops")
        if table:
            _merge(values, sources, table, "project pyproject.toml [tool.remoteops]", str(pyproject))
            files.append(str(pyproject))

    _merge(values, sources, _from_env(env), None, "environment")
    if flags:
        _merge(values, sources, _unflatten({k: v for k, v in flags.items() if v is not None}),
               "flag", "command line")
    _validate(values, sources)
    return Settings(values, sources, project, files)


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        where = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        problem = re.sub(r"\s*\(at line.*\)$", "", msg) or "invalid TOML"
        loc = f"line {where.group(1)}, column {where.group(2)}" if where else "somewhere"
        raise ConfigError(f"{path}: {loc}: {problem}; fix the TOML syntax there.") from None


def _merge(values: dict, sources: dict, layer: Mapping, label: str | None, origin: str,
           prefix: str = "") -> None:
    """Merge ``layer`` into ``values``; ``label`` None means each leaf is (value, label)."""
    for key, raw in layer.items():
        dotted = f"{prefix}{key}"
        _refuse_secret(dotted, raw, origin)
        top = dotted.split(".")[0]
        if isinstance(raw, Mapping) and not _is_ref(raw):
            node = values.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{origin}: '{dotted}' must be a single value, not a table.")
            _merge(node, sources, raw, label, origin, dotted + ".")
            continue
        value, src = (raw if label is None else (raw, label))
        if top not in OPEN_TABLES and key not in values:
            choices = [k for k in values]
            hint = difflib.get_close_matches(key, choices, n=1)
            suggestion = f" Did you mean '{prefix}{hint[0]}'?" if hint else ""
            raise ConfigError(f"{origin}: unknown setting '{dotted}'.{suggestion} "
                              "Run 'invoke config' to see every setting.")
        if isinstance(values.get(key), dict):
            raise ConfigError(f"{origin}: '{dotted}' is a table; set its keys instead.")
        values[key] = _coerce(dotted, value, values.get(key), origin)
        sources[dotted] = src


def _coerce(dotted: str, value: Any, default: Any, origin: str) -> Any:
    if default is None or isinstance(value, type(default)) and not (
            isinstance(default, float) and isinstance(value, bool)):
        return float(value) if isinstance(default, float) and isinstance(value, int) else value
    if isinstance(default, bool) and isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return type(default)(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(default, list) and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = type(default).__name__
    raise ConfigError(f"{origin}: '{dotted}' must be {_article(kind)} {kind}, got {value!r}.")


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


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
        if isinstance(value, Mapping) and value and not _is_ref(value):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def _is_ref(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"$env"}


def _refuse_secret(dotted: str, value: Any, origin: str) -> None:
    leaf = dotted.rsplit(".", 1)[-1]
    if _PASSWORD_KEYS.match(leaf):
        raise ConfigError(f"{origin}: '{dotted}' looks like a password; remoteops never stores "
                          "passwords: remove it and log in with an SSH key or ssh-agent.")
    if _SECRET_KEYS.search(leaf) and not _is_ref(value) and not isinstance(value, Mapping):
        raise ConfigError(f"{origin}: '{dotted}' holds a secret in plain text; reference it "
                          f"instead, e.g. {leaf} = {{\"$env\" = \"MY_{leaf.upper()}\"}}.")


def resolve_secret(value: Any, env: Mapping[str, str] | None = None) -> str | None:
    """The secret a ``{"$env": NAME}`` reference points at (None when unset)."""
    if value in (None, ""):
        return None
    if _is_ref(value):
        env = os.environ if env is None else env
        name = value["$env"]
        if name not in env:
            raise ConfigError(f"the environment variable {name} referenced in the config is not "
                              f"set; export it before running.")
        return env[name]
    raise ConfigError("secrets must be referenced as {\"$env\" = \"NAME\"}, not written out.")


def _mask(key: str, value: Any) -> Any:
    if _is_ref(value):
        return f"$env:{value['$env']}"
    return value


def _validate(values: dict, sources: dict) -> None:
    gate = values["gpu_gate"]
    if gate not in GPU_GATE_LEVELS:
        where = sources.get("gpu_gate", "default")
        raise ConfigError(f"gpu_gate is {gate!r} (from {where}); use one of "
                          f"{', '.join(GPU_GATE_LEVELS)}.")
    for name, entry in values["hosts"].items():
        if not isinstance(entry, dict):
            raise ConfigError(f"hosts.{name} must be a table, e.g. [hosts.{name}] host = "
                              "\"gpu.example.com\".")
        for key in entry:
            if key not in HOST_KEYS:
                hint = difflib.get_close_matches(key, HOST_KEYS, n=1)
                extra = f" Did you mean '{hint[0]}'?" if hint else ""
                raise ConfigError(f"unknown key 'hosts.{name}.{key}'.{extra} Host entries take "
                                  f"{', '.join(HOST_KEYS)}.")
