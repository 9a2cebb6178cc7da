"""Hooks for any training loop: the signals, metrics and health checks of the built-in trainer.

    from remoteops.hooks import TrainingHooks

    hooks = TrainingHooks()              # run dir and stage from the stage's environment
    for step, batch in enumerate(data, 1):
        loss, grad_norm = train_step(batch)
        if hooks.check(step, loss=loss, grad_norm=grad_norm, lr=lr):
            break                        # <stage>.failed is written; the runner stops the stage
        hooks.log_metrics(step, loss=loss, lr=lr, grad_norm=grad_norm)
    else:
        hooks.mark_done({"loss": loss})

No torch, no transformers: plain Python, so it works in any trainer. A command stage runs
with ``REMOTEOPS_RUN_DIR``, ``REMOTEOPS_STAGE`` and ``REMOTEOPS_PROJECT_ROOT`` set; pass
``run_dir=`` and ``stage=`` to use it elsewhere. With neither, nothing is written and
``check`` still judges (the same script runs outside remoteops).

``check`` applies the built-in trainer's rules (``remoteops.common.health``: NaN/inf loss
or gradient norm, divergence, learning rate stuck at 0 after ``warmup_steps``, optional
stagnation) with the project's ``[health]`` settings (and ``[stages.<stage>.health]``),
plus every ``health_rules`` plugin. After ``health.warmup_check_steps`` clean checks it
marks the stage healthy, as the built-in trainer does. The signals are the built-in
trainer's files (``<stage>.healthy|done|failed`` and their JSON, through
``remoteops.common.rundir.RunDir``), which the runner and ``invoke status`` read. In a
multi-process run (``RANK`` set, as torchrun, accelerate and DeepSpeed do) only rank 0
writes metrics, ``healthy`` and ``done``; any rank may write ``failed``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple

from remoteops.common.defaults import HEALTH_DEFAULTS
from remoteops.common.health import HealthJudge, Rule
from remoteops.common.rundir import RunDir
from remoteops.common.runs import RUNS_DIR

ENV_RUN_DIR = "REMOTEOPS_RUN_DIR"
ENV_STAGE = "REMOTEOPS_STAGE"
ENV_PROJECT_ROOT = "REMOTEOPS_PROJECT_ROOT"


class Problem(NamedTuple):
    """What ``check`` found wrong with a step."""

    reason: str
    message: str
    step: int


def _number(value: Any) -> float | None:
    """A plain float from a float, an int, a 0-d tensor or array, or text ('nan')."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _project_root(run_dir: Path | None) -> Path | None:
    env = os.environ.get(ENV_PROJECT_ROOT)
    if env:
        return Path(env)
    if run_dir is not None and run_dir.parent.name == RUNS_DIR.name:
        return run_dir.parents[len(RUNS_DIR.parts)]  # <root>/outputs/training_sync/run_X
    return None


class TrainingHooks:
    """One stage's hooks, for one training process."""

    def __init__(self, run_dir: str | os.PathLike | None = None, stage: str | None = None, *,
                 project_root: str | os.PathLike | None = None,
                 health: dict[str, Any] | None = None, rules: list[Rule] | None = None,
                 warmup_steps: int = 0, load_plugins: bool = True):
        run_dir = run_dir or os.environ.get(ENV_RUN_DIR) or None
        self.stage = stage or os.environ.get(ENV_STAGE) or "train"
        self.run = RunDir(Path(run_dir), self.stage) if run_dir else None
        root = Path(project_root) if project_root else _project_root(
            Path(run_dir) if run_dir else None)
        settings = _settings(root) if root is not None and health is None else None
        self.health = dict(HEALTH_DEFAULTS)
        if settings is not None:
            self.health.update(settings["health"])
            self.health.update((settings["stages"].get(self.stage) or {}).get("health") or {})
        self.health.update(health or {})
        if rules is None:
            rules = _plugin_rules(root, settings) if load_plugins and settings is not None else []
        self.judge = HealthJudge.from_settings(self.health, rules, warmup_steps=warmup_steps)
        self.rank0 = os.environ.get("RANK", "0") in ("", "0")
        self.failure: Problem | None = None
        self.healthy = False
        self.done = False
        self._clean = 0

    @property
    def active(self) -> bool:
        """Whether signals and metrics are written (a run directory is known)."""
        return self.run is not None

    # -- the checks ------------------------------------------------------------------
    def check(self, step: int, loss: Any = None, grad_norm: Any = None,
              lr: Any = None) -> Problem | None:
        """Judge one step *before* it is applied; on a problem mark the stage failed and
        return it (stop training then: skip the optimizer step, end the loop)."""
        if self.failure is not None:
            return self.failure
        found = self.judge.judge(step, _number(loss), _number(grad_norm), _number(lr))
        if found:
            self.mark_failed(found[0], found[1], step=step)
            return self.failure
        self._clean += 1
        if self.run is not None:
            self.run.step = step
        if not self.healthy and self._clean >= int(self.health["warmup_check_steps"]):
            self.mark_healthy(step, _number(loss), why="warmup check passed")
        return None

    # -- the signals -----------------------------------------------------------------
    def mark_healthy(self, step: int, loss: Any = None, why: str = "marked healthy") -> None:
        """Write ``<stage>.healthy`` (once)."""
        if self.healthy:
            return
        self.healthy = True
        if self.run is not None and self.rank0:
            self.run.signal("healthy", why, step=step, loss=_number(loss))

    def mark_failed(self, reason: str, message: str, step: int | None = None) -> None:
        """Write ``<stage>.failed`` with a failure class (``nan``, ``divergence``, ``oom``,
        or your own word) and a message; the runner stops the stage with them."""
        self.failure = Problem(str(reason), str(message), step if step is not None else -1)
        if self.run is not None:
            self.run.signal("failed", str(reason), message=str(message), step=step)

    def mark_done(self, metrics: dict[str, Any] | None = None) -> bool:
        """Write ``<stage>.done`` with final metrics; False (nothing written) once the stage
        has failed: a failed stage is never also done."""
        if self.failure is not None:
            return False
        self.done = True
        if self.run is not None and self.rank0:
            final = {k: _number(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v
                     for k, v in (metrics or {}).items()}
            self.run.signal("done", "training finished", final=final)
        return True

    def log_metrics(self, step: int, **metrics: Any) -> None:
        """Append a row to the run's ``metrics.csv`` (``loss``, ``lr``, ``grad_norm``,
        ``eval_loss``, ``epoch``, ``tokens_per_s``, ``time``; other names are ignored)."""
        if self.run is None or not self.rank0:
            return
        self.run.step = step
        self.run.append_metrics({"step": step, **{k: _number(v) for k, v in metrics.items()}})

    def beat(self, step: int | None = None) -> None:
        """Write the run's ``heartbeat`` (time, pid, stage, step)."""
        if self.run is not None and self.rank0:
            if step is not None:
                self.run.step = step
            self.run.beat()


def _settings(root: Path):
    from remoteops.common.config import load_settings

    if not (root / "remoteops.toml").is_file() and not (root / "pyproject.toml").is_file():
        return None
    return load_settings(root)


def _plugin_rules(root: Path, settings) -> list[Rule]:
    from remoteops.plugins import get_plugin_manager, health_rules

    pm = get_plugin_manager(root, settings["plugins_dir"])
    return health_rules(pm, settings)


__all__ = ["TrainingHooks", "Problem", "ENV_RUN_DIR", "ENV_STAGE", "ENV_PROJECT_ROOT"]
