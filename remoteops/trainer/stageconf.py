"""One stage's effective training settings (pure Python, no torch).

Order, lowest to highest: ``[train]`` < ``[stages.<name>.train]`` < preset
(quick/standard/extended scale epochs and cap the sequence length) < flags.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remoteops.common.errors import ConfigError
from remoteops.common.defaults import EVAL_DEFAULTS, HEALTH_DEFAULTS, PRESETS, TRAIN_DEFAULTS  # noqa: F401

@dataclass
class StageConfig:
    """Everything the trainer needs for one stage; paths are absolute."""

    name: str
    project_dir: Path
    dataset: Path | None  # None for a live dataset (``live``)
    eval_set: Path | None
    preset: str
    train: dict[str, Any]
    health: dict[str, Any]
    eval: dict[str, Any]
    targets: dict[str, float] = field(default_factory=dict)
    # a live dataset (``dataset_live``): dest, min_samples, poll_seconds, grow_every_steps,
    # max_steps (``remoteops.trainer.live_data``)
    live: dict[str, Any] | None = None

    @property
    def base_model(self) -> Path:
        """The folder holding the base model here: the folder ``train.base_model`` names, or
        a hub id's snapshot in this machine's cache (see ``remoteops.common.model_ref``)."""
        import os

        from remoteops.common import model_ref

        try:
            ref = model_ref.choose(model_ref.parse(self.train["base_model"]), self.project_dir)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        folder = model_ref.model_folder(ref, self.project_dir, os.environ)
        if folder is None:  # a hub model not in the cache (yet): where it will be
            folder = (model_ref.hf_repo_dir(ref, os.environ) if ref.kind == "hf"
                      else model_ref.modelscope_dirs(ref, os.environ)[0])
        return Path(folder)

    @property
    def adapter_dir(self) -> Path:
        return self.project_dir / "outputs" / "adapter" / f"adapter_{self.name}"

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.name, "dataset": str(self.dataset) if self.dataset else None,
                "live": {**self.live, "dest": str(self.live["dest"])} if self.live else None,
                "eval_set": str(self.eval_set) if self.eval_set else None,
                "preset": self.preset, "base_model": str(self.base_model),
                "train": dict(self.train), "health": dict(self.health),
                "targets": dict(self.targets)}


def _abs(project: Path, value: str | Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (project / path)


def _override(table: dict, overrides: Any, where: str, defaults: dict) -> None:
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where} must be a table of settings, e.g. [{where}] lr = 2e-4.")
    for key, value in overrides.items():
        if key not in defaults:
            hint = difflib.get_close_matches(key, list(defaults), n=1)
            extra = f" Did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"unknown setting '{where}.{key}'.{extra} Stage overrides take the "
                              f"keys of the matching top-level table.")
        default = defaults[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"'{where}.{key}' must be a {type(default).__name__}, got {value!r}.")
        table[key] = value


def read_overrides(path: str | None) -> dict[str, Any] | None:
    """The ``train`` table of an overrides file (JSON, typed values), or None."""
    if not path:
        return None
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the overrides file {path}: {exc}.") from None
    train = data.get("train") if isinstance(data, dict) else None
    if not isinstance(train, dict):
        raise ConfigError(f"the overrides file {path} must hold {{\"train\": {{...}}}}.")
    return train


def resolve_stage(settings, stage: str, preset: str | None = None,
                  overrides: dict[str, Any] | None = None) -> StageConfig:
    """The effective settings of ``stage`` from loaded ``settings`` (see remoteops.common.config)."""
    stages = settings.get("stages") or {}
    entry = stages.get(stage)
    if entry is None:
        known = ", ".join(sorted(stages)) or "none"
        raise ConfigError(f"stage '{stage}' is not configured (configured: {known}); add a "
                          f"[stages.{stage}] table with dataset = \"data/{stage}.jsonl\".")
    if not isinstance(entry, dict):
        raise ConfigError(f"stages.{stage} must be a table with at least dataset = \"...\".")
    project = Path(settings.project_dir)
    train = dict(settings["train"])
    health = dict(settings["health"])
    evalc = dict(settings["eval"])
    _override(train, entry.get("train"), f"stages.{stage}.train", TRAIN_DEFAULTS)
    _override(health, entry.get("health"), f"stages.{stage}.health", HEALTH_DEFAULTS)
    _override(evalc, entry.get("eval"), f"stages.{stage}.eval", EVAL_DEFAULTS)

    dataset = entry.get("dataset")
    live = None
    if entry.get("dataset_live"):
        live = {"dest": _abs(project, entry["dataset_live"]),
                "min_samples": int(entry.get("min_samples", 1)),
                "poll_seconds": float(entry.get("poll_seconds", 60.0)),
                "grow_every_steps": int(entry.get("grow_every_steps", 0)),
                "max_steps": int(entry.get("max_steps", 0))}
    elif not dataset:
        raise ConfigError(f"stages.{stage} has no dataset; set dataset = \"data/{stage}.jsonl\".")
    eval_set = entry.get("eval_set")

    preset_name = preset or entry.get("preset") or train.get("preset") or "standard"
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown preset '{preset_name}' for stage '{stage}'; use one of "
                          f"{', '.join(PRESETS)}.")
    rules = PRESETS[preset_name]
    train["epochs"] = max(1.0, train["epochs"] * rules.get("epochs_scale", 1.0))
    if "max_seq_len_cap" in rules:
        train["max_seq_len"] = min(train["max_seq_len"], int(rules["max_seq_len_cap"]))
    train["preset"] = preset_name
    if overrides:
        _override(train, overrides, "train", TRAIN_DEFAULTS)

    targets = {"coverage": evalc["coverage_target"], "format": evalc["format_target"]}
    user_targets = entry.get("targets") or {}
    for key, value in user_targets.items():
        if key not in ("coverage", "format"):
            raise ConfigError(f"stages.{stage}.targets.{key} is unknown; targets are coverage "
                              "and format, shares between 0 and 1.")
        targets[key] = float(value)

    _check_values(stage, train)
    return StageConfig(stage, project, _abs(project, dataset) if dataset else None,
                       _abs(project, eval_set) if eval_set else None, preset_name,
                       train, health, evalc, targets, live)


def _check_values(stage: str, train: dict[str, Any]) -> None:
    where = f"stage '{stage}'"
    if train["epochs"] <= 0:
        raise ConfigError(f"{where}: train.epochs must be > 0.")
    for key in ("batch_size", "grad_accum", "max_seq_len", "lora_r"):
        if train[key] < 1:
            raise ConfigError(f"{where}: train.{key} must be at least 1.")
    if train["max_seq_len"] < 2:
        raise ConfigError(f"{where}: train.max_seq_len must be at least 2 tokens.")
    if train["lr"] < 0:
        raise ConfigError(f"{where}: train.lr must not be negative.")
    if train["quantization"] not in ("none", "qlora"):
        raise ConfigError(f"{where}: train.quantization is {train['quantization']!r}; use "
                          "\"none\" (LoRA) or \"qlora\".")
    fault = train["inject_fault"]
    if fault and not re.fullmatch(r"((nan|explode|oom|cuda|kill|hang)(@[1-9]\d*)?|oom>[1-9]\d*)"
                                  r"(:rank\d+)?", fault):
        raise ConfigError(f"{where}: train.inject_fault is {fault!r}; use nan@STEP, explode@STEP, "
                          "oom@STEP, oom>BATCH, cuda@STEP, kill@STEP or hang@STEP, optionally :rankN for "
                          "one torchrun rank (or \"\" for none).")
    if not 0 <= train["eval_holdout"] < 1:
        raise ConfigError(f"{where}: train.eval_holdout must be in [0, 1).")
