"""Every hook remoteops calls. A plugin implements any subset of them.

Registration hooks take a ``register`` callback instead of returning things,
and an implementation may accept fewer arguments than the spec lists.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("remoteops")
hookimpl = pluggy.HookimplMarker("remoteops")


@hookspec
def register_checks(register: Callable[[Any], None], settings: Any) -> None:
    """Register precheck checks: ``register(MyCheck())`` with ``remoteops.Check`` instances."""


@hookspec
def register_executors(register: Callable[[str, Any], None]) -> None:
    """Register stage executors by name: ``register("torchrun", TorchrunExecutor)``, each a
    ``remoteops.api.Executor`` subclass; ``[stages.X] executor = "NAME"`` picks one."""


@hookspec
def before_stage(stage: str, run_dir: str, settings: Any) -> None:
    """Called on the server before a pipeline stage starts."""


@hookspec
def after_stage(stage: str, run_dir: str, status: str, settings: Any) -> None:
    """Called on the server after a pipeline stage ends, whatever its status."""


@hookspec
def health_rules(register: Callable[[Any], None], settings: Any) -> None:
    """Register training health rules: ``register(rule)``, where ``rule(step, loss=None,
    grad_norm=None, lr=None)`` returns ``(reason, message)`` for a bad step, else None. Both
    health watches run them: the built-in trainer's before each optimizer step, and the
    log watch of command stages on each loss it reads."""


@hookspec
def post_eval(stage: str, report: dict, run_dir: str, settings: Any) -> None:
    """Apply post-eval fixes to a stage's eval report (mutate ``report`` in place)."""


@hookspec
def register_quant_checks(register: Callable[[str, Any], None], settings: Any) -> None:
    """Register quantization feasibility checks by name."""


@hookspec
def report_sections(run_dir: str, summary: dict, settings: Any) -> list[tuple[str, str]] | None:
    """Return ``(title, markdown)`` sections to add to the run's TRAINING_SUMMARY.md."""
