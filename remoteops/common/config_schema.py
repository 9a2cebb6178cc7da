"""Types, ranges and choices of every setting, checked once when the settings load.

A bad value is refused where it was written (``file:line``, the environment
variable or the flag) with what to write instead, before anything runs: a
heartbeat of 0 spinning the runner, a port the SSH layer cannot parse or a
zstd level it rejects would otherwise surface later as a traceback.

The merge in ``remoteops.common.config`` already forces each known key to its
default's type; this module adds what the type cannot say, and checks the
free-form tables (``[hosts.NAME]``, ``[stages.NAME]``) whose shape no default
describes. tomllib keeps no line numbers, so ``find_line`` scans the file
text for the key (tables, dotted keys and inline tables; good enough to point
a person at the right line).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from remoteops.common.defaults import KINDS, PRESETS
from remoteops.common.errors import ConfigError, close_match
from remoteops.common.host_tables import check_group, check_overrides

Locate = Callable[[str], str]


@dataclass(frozen=True)
class Rule:
    """What a value must be, beyond its type."""

    low: float | None = None       # value >= low (or > low when low_open)
    low_open: bool = False
    high: float | None = None      # value <= high (or < high when high_open)
    high_open: bool = False
    choices: tuple | None = None
    items: type | None = None      # a list whose items are of this type
    pattern: str | None = None     # a string that fully matches this regex
    allow_inf: bool = False
    why: str = ""

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.pattern:
            return self.why or f"text matching {self.pattern}"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return "a number " + " and ".join(parts)


GT0 = Rule(low=0, low_open=True)
GE0 = Rule(low=0)
GE1 = Rule(low=1)
SHARE = Rule(low=0, high=1)
STRINGS = Rule(items=str)

RULES: dict[str, Rule] = {
    "gpu_gate": Rule(choices=("strict", "warn", "off")),
    "project_name": Rule(pattern=r"|[A-Za-z0-9_][A-Za-z0-9._+-]*",
                         why="a plain name (letters, digits, . _ + -; no / or leading dot)"),
    "datasets": STRINGS,
    "ssh.connect_timeout": GT0,
    "ssh.keepalive": GE0,           # 0 turns keepalive off
    "ssh.connect_retries": GE0,
    "ssh.retry_backoff": GE0,
    "ssh.command_timeout": GT0,
    "ssh.client": Rule(choices=("auto", "openssh", "paramiko")),
    "ssh.persist": GE0,             # 0: no kept connection (laptop/keeper)
    "precheck.min_python": Rule(pattern=r"\d+(\.\d+){0,2}", why="a version such as 3.10"),
    "precheck.required_packages": STRINGS,
    "precheck.optional_packages": STRINGS,
    "precheck.min_disk_gb": GE0,
    "precheck.min_ram_gb": GE0,
    "precheck.min_vram_gb": GE0,
    "bundle.include": STRINGS,
    "bundle.exclude": STRINGS,
    "bundle.include_secrets": STRINGS,
    "bundle.compression_level": Rule(low=1, high=22),   # zstd's levels
    "deploy.keep_backups": GE1,     # the backup of the latest deploy is what undo needs
    "pipeline.stages": STRINGS,
    "pipeline.max_retries": GE0,
    "pipeline.oom_retries": GE0,
    "pipeline.heartbeat_seconds": GT0,
    "pipeline.poll_seconds": GT0,
    "pipeline.stop_grace_seconds": GE0,   # read only where a release defines it
    "sync.format": Rule(choices=("dirs", "files", "jsonl")),
    "sync.dest": Rule(pattern=r"(?!/)(?!.*(^|/)\.\.(/|$))(?!\.remoteops(/|$))[^\0\\]+",
                      why="a folder relative to the project root, e.g. \"data/live\""),
    "sync.poll_seconds": GT0,
    "sync.settle_seconds": GE0,
    "sync.batch_max": GE1,
    "train.epochs": GT0,
    "train.batch_size": GE1,
    "train.grad_accum": GE1,
    "train.lr": GE0,
    "train.warmup_steps": GE0,
    "train.weight_decay": GE0,
    "train.max_grad_norm": GE0,
    "train.max_seq_len": Rule(low=2),
    "train.lora_r": GE1,
    "train.lora_alpha": GT0,
    "train.lora_dropout": Rule(low=0, high=1, high_open=True),
    "train.lora_targets": STRINGS,
    "train.quantization": Rule(choices=("none", "qlora")),
    "train.preset": Rule(choices=("quick", "standard", "extended")),
    "train.seed": GE0,
    "train.max_bad_lines": GE0,
    "train.eval_holdout": Rule(low=0, high=1, high_open=True),
    "train.save_total_limit": GE1,
    "train.logging_steps": GE1,
    "train.inject_fault": Rule(pattern=r"|((nan|explode|oom|cuda|kill|hang)(@[1-9]\d*)?"
                                       r"|oom>[1-9]\d*)(:rank\d+)?",
                               why="nan@STEP, explode@STEP, oom@STEP, oom>BATCH, cuda@STEP, "
                                   "kill@STEP, hang@STEP (each optionally :rankN, one torchrun "
                                   "rank) or \"\""),
    "health.loss_max": Rule(low=0, low_open=True, allow_inf=True),
    "health.explode_ratio": Rule(low=1, low_open=True),
    "health.warmup_check_steps": GE0,
    "health.stagnation_steps": GE0,
    "health.stagnation_min_delta": GE0,
    "health.heartbeat_seconds": GT0,
    "health.stale_seconds": GT0,
    "health.grad_overflow_steps": GE0,
    "health.window_seconds": GE0,   # 0: healthy only when the process says so
    "slurm.partition": Rule(pattern=r"[A-Za-z0-9_.,-]*", why="a partition name, e.g. \"gpu\""),
    "slurm.account": Rule(pattern=r"[A-Za-z0-9_.-]*", why="an account name"),
    "slurm.gres": Rule(pattern=r"[A-Za-z0-9_:,.-]*", why="sbatch --gres text, e.g. \"gpu:2\""),
    "slurm.time": Rule(pattern=r"|\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|(?i:unlimited|infinite)",
                       why="sbatch --time text: MINUTES, H:MM:SS or DAYS-HOURS, e.g. \"4:00:00\""),
    "slurm.cpus": GE0,              # 0: sbatch's default
    "slurm.mem": Rule(pattern=r"|\d+[KMGT]?", why="sbatch --mem text, e.g. \"64G\""),
    "slurm.extra": STRINGS,
    "slurm.poll_seconds": GT0,
    "slurm.chain": Rule(choices=("upfront", "stage")),
    "eval.max_new_tokens": GE1,
    "eval.coverage_target": SHARE,
    "eval.format_target": SHARE,
}

# The one list of host keys (config.py reads it from here).
HOST_KEYS = ("host", "hostname", "port", "user", "identity_file", "proxy_jump",
             "project_root", "remote_python", "passphrase", "overrides", "rdzv_host")
HOST_TYPES: dict[str, type] = {"host": str, "hostname": str, "port": int, "user": str,
                               "identity_file": str, "proxy_jump": str, "project_root": str,
                               "remote_python": str, "overrides": dict, "rdzv_host": str}

# Keys of [stages.NAME] whose type is known; other keys are left to the stage's consumer.
STAGE_TYPES: dict[str, type] = {"dataset": str, "eval_set": str, "preset": str, "command": str,
                                "kind": str, "description": str, "train": dict, "health": dict,
                                "eval": dict, "targets": dict, "retries": int,
                                "depends_on": list, "outputs": list, "loss_pattern": str,
                                "dataset_live": str, "min_samples": int,
                                "grow_every_steps": int, "max_steps": int,
                                "executor": str, "nproc_per_node": int, "nnodes": int,
                                "rdzv_endpoint": str, "rdzv_id": str, "slurm": dict,
                                "rdzv_port": int, "rdzv_timeout": int}
# Ranges of the executor keys of [stages.NAME] (the executor plugin checks the rest).
STAGE_RULES: dict[str, Rule] = {
    "nproc_per_node": GE1, "nnodes": GE1,
    "rdzv_endpoint": Rule(pattern=r"[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}", why="HOST:PORT"),
}


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list", dict: "a table"}.get(kind, kind.__name__)


def _fail(where: str, dotted: str, value: Any, should: str, default: Any = None) -> ConfigError:
    shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 60 else \
        type(value).__name__
    example = f" (the default is {default!r})" if default not in (None, "", [], {}) else ""
    return ConfigError(f"{where}: '{dotted}' is {shown}; it must be {should}{example}. "
                       "Fix it there.")


def check_value(dotted: str, value: Any, rule: Rule, where: str, default: Any = None) -> None:
    """Raise ConfigError unless ``value`` obeys ``rule``."""
    if rule.choices is not None:
        if value not in rule.choices:
            raise _fail(where, dotted, value, rule.describe())
        return
    if rule.items is not None:
        if not isinstance(value, list) or not all(isinstance(v, rule.items) for v in value):
            raise _fail(where, dotted, value, f"a list of {_type_name(rule.items)[2:].strip()}s",
                        default)
        return
    if rule.pattern is not None:
        if not isinstance(value, str) or not re.fullmatch(rule.pattern, value):
            raise _fail(where, dotted, value, rule.describe(), default)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, dotted, value, rule.describe(), default)
    if math.isnan(value) or (math.isinf(value) and not rule.allow_inf):
        raise _fail(where, dotted, value, "a finite " + rule.describe(), default)
    low_bad = rule.low is not None and (value <= rule.low if rule.low_open else value < rule.low)
    high_bad = rule.high is not None and (value >= rule.high if rule.high_open
                                          else value > rule.high)
    if low_bad or high_bad:
        raise _fail(where, dotted, value, rule.describe(), default)


def _lookup(values: dict, dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def validate(values: dict, defaults: dict, locate: Locate) -> None:
    """Check every setting; ``locate(dotted)`` says where a key was set (``file:line``)."""
    for dotted, rule in RULES.items():
        value = _lookup(values, dotted)
        if value is not _MISSING:
            check_value(dotted, value, rule, locate(dotted), _lookup(defaults, dotted))
    _check_loss_pattern(values["health"]["loss_pattern"], "health.loss_pattern", locate)
    for name, entry in values["hosts"].items():
        _check_host(name, entry, locate)
        if isinstance(entry.get("overrides"), dict):  # several hosts: common/host_tables
            check_overrides(name, entry["overrides"], defaults, RULES, check_value, locate)
    for name, entry in values.get("groups", {}).items():
        check_group(name, entry, locate)
    for name, entry in values["stages"].items():
        _check_stage(name, entry, values, defaults, locate)
    for name, entry in values["plugins"].items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{locate(f'plugins.{name}')}: 'plugins.{name}' is {entry!r}; it "
                              f"must be a table, e.g. [plugins.{name}] enabled = true. Fix it "
                              "there.")


def _check_loss_pattern(pattern: Any, dotted: str, locate: Locate) -> None:
    if pattern == "":
        return  # the built-in line formats only
    try:
        groups = re.compile(pattern).groups if isinstance(pattern, str) else -1
    except re.error as exc:
        raise ConfigError(f"{locate(dotted)}: '{dotted}' is not a valid regular expression "
                          f"({exc}); fix it there.") from None
    if groups < 1:
        raise ConfigError(f"{locate(dotted)}: '{dotted}' must be a regular expression with one "
                          "group that captures the loss, e.g. loss[=:]\\s*([0-9.e+-]+|nan|inf).")


def _check_host(name: str, entry: Any, locate: Locate) -> None:
    where = locate(f"hosts.{name}")
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: 'hosts.{name}' must be a table, e.g. [hosts.{name}] host = "
                          "\"gpu.example.com\".")
    for key, value in entry.items():
        dotted = f"hosts.{name}.{key}"
        if key not in HOST_KEYS:
            hint = close_match(key, HOST_KEYS)
            extra = f" Did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"{locate(dotted)}: unknown key '{dotted}'.{extra} Host entries "
                              f"take {', '.join(HOST_KEYS)}.")
        kind = HOST_TYPES.get(key)
        if key == "port" and isinstance(value, str) and value.strip().isdigit():
            value = entry[key] = int(value)  # from the environment every value is text
        if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            example = "22" if key == "port" else f"\"{key}-value\""
            raise ConfigError(f"{locate(dotted)}: '{dotted}' is {value!r}; it must be "
                              f"{_type_name(kind)}, e.g. {key} = {example}. Fix it there.")
        if key == "port" and not 1 <= value <= 65535:
            raise ConfigError(f"{locate(dotted)}: '{dotted}' is {value}; a port is 1 to 65535 "
                              "(SSH's is 22). Fix it there.")


def _check_live_combination(name: str, entry: dict, locate: Locate) -> None:
    """A live dataset's keys need ``dataset_live``, and a stage trains on one dataset."""
    if entry.get("dataset_live") and entry.get("dataset"):
        raise ConfigError(f"{locate(f'stages.{name}.dataset_live')}: stage '{name}' names both "
                          "dataset and dataset_live; keep one (dataset_live for samples that "
                          "arrive while it trains).")
    for key in ("min_samples", "poll_seconds", "grow_every_steps", "max_steps"):
        if key in entry and not entry.get("dataset_live"):
            raise ConfigError(f"{locate(f'stages.{name}.{key}')}: 'stages.{name}.{key}' applies "
                              f"to a live dataset only; add dataset_live = \"data/live\" to "
                              f"[stages.{name}], or remove {key}.")


def _check_stage(name: str, entry: Any, values: dict, defaults: dict, locate: Locate) -> None:
    if not isinstance(entry, dict):
        raise ConfigError(f"{locate(f'stages.{name}')}: 'stages.{name}' is {entry!r}; it must be "
                          f"a table, e.g. [stages.{name}] dataset = \"data/{name}.jsonl\" (or "
                          "command = \"...\"). Fix it there.")
    for key, value in entry.items():
        dotted = f"stages.{name}.{key}"
        kind = STAGE_TYPES.get(key)
        if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ConfigError(f"{locate(dotted)}: '{dotted}' is {value!r}; it must be "
                              f"{_type_name(kind)}. Fix it there.")
    if "kind" in entry:
        check_value(f"stages.{name}.kind", entry["kind"], Rule(choices=tuple(KINDS)),
                    locate(f"stages.{name}.kind"))
    if "preset" in entry:
        check_value(f"stages.{name}.preset", entry["preset"], Rule(choices=tuple(PRESETS)),
                    locate(f"stages.{name}.preset"))
    for key, rule in (("dataset_live", RULES["sync.dest"]), ("min_samples", GE1),
                      ("poll_seconds", GT0), ("grow_every_steps", GE0), ("max_steps", GE0)):
        if key in entry:
            check_value(f"stages.{name}.{key}", entry[key], rule, locate(f"stages.{name}.{key}"))
    _check_live_combination(name, entry, locate)
    if "retries" in entry:
        check_value(f"stages.{name}.retries", entry["retries"], GE0,
                    locate(f"stages.{name}.retries"))
    for key, rule in STAGE_RULES.items():
        if key in entry:
            check_value(f"stages.{name}.{key}", entry[key], rule, locate(f"stages.{name}.{key}"))
    for table in ("train", "health", "eval", "slurm"):
        for key, value in entry.get(table, {}).items():
            dotted = f"stages.{name}.{table}.{key}"
            if key not in defaults[table]:
                hint = close_match(key, list(defaults[table]))
                extra = f" Did you mean '{hint[0]}'?" if hint else ""
                raise ConfigError(f"{locate(dotted)}: unknown setting '{dotted}'.{extra} Stage "
                                  f"overrides take the keys of [{table}].")
            default = defaults[table][key]
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value,
                                                                                        bool):
                value = entry[table][key] = float(value)
            if type(value) is not type(default):
                raise ConfigError(f"{locate(dotted)}: '{dotted}' is {value!r}; it must be "
                                  f"{_type_name(type(default))} like [{table}].{key}. Fix it "
                                  "there.")
            rule = RULES.get(f"{table}.{key}")
            if rule is not None:
                check_value(dotted, value, rule, locate(dotted), default)
            if f"{table}.{key}" == "health.loss_pattern":
                _check_loss_pattern(value, dotted, locate)
    for key, value in entry.get("targets", {}).items():
        dotted = f"stages.{name}.targets.{key}"
        if key not in ("coverage", "format"):
            raise ConfigError(f"{locate(dotted)}: unknown target '{dotted}'; targets are "
                              "coverage and format, shares between 0 and 1.")
        check_value(dotted, value, SHARE, locate(dotted))


def check_executor(stage: str, table: dict, registered: list[str]) -> str:
    """The executor name of ``[stages.<stage>]`` (default ``process``); ConfigError (one
    line, listing ``registered``) for a name no plugin registered."""
    name = table.get("executor", "process")
    if name not in registered:
        hint = close_match(str(name), registered)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"stages.{stage}.executor is {name!r}, which no plugin registers"
                          f"{extra}; use one of {', '.join(registered)} in remoteops.toml.")
    return name


# -- where a key was written ------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?\s*(?P<key>[^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*(?P<key>(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
                  r"""(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")
_PART = re.compile(r"""[A-Za-z0-9_-]+|"((?:[^"\\]|\\.)*)"|'([^']*)'""")


def split_key(text: str) -> list[str]:
    """``a."b.c".d`` -> ``['a', 'b.c', 'd']``."""
    out = []
    for m in _PART.finditer(text):
        out.append(m.group(1) if m.group(1) is not None else
                   m.group(2) if m.group(2) is not None else m.group(0))
    return out


def find_line(text: str, parts: list[str]) -> int | None:
    """The 1-based line where the key ``parts`` is set in TOML ``text`` (best effort)."""
    table: list[str] = []
    near = None
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            table = split_key(header.group("key"))
            if table == parts:
                return number
            continue
        key = _KEY.match(line)
        if not key:
            continue
        full = table + split_key(key.group("key"))
        if full == parts:
            return number
        if near is None and len(full) < len(parts) and parts[:len(full)] == full:
            near = number  # an inline table (or a table given a value) holding the key
    return near


__all__ = ["Rule", "RULES", "validate", "check_value", "check_executor", "find_line",
           "split_key"]
