"""Stage executors: how a stage's process is launched, watched and stopped.

An executor is registered by name through the ``register_executors`` hook and chosen per
stage with ``[stages.X] executor = "NAME"`` (default ``process``)::

    from remoteops.api import Executor, hookimpl

    class Nice(Executor):
        name = "nice"

        def _wrap(self, launch):
            return ["nice", "-n", "10", *launch.argv]

    @hookimpl
    def register_executors(register):
        register("nice", Nice)

The runner hands the executor a ``Launch`` (what the ``process`` executor would start:
the argv, and when it is Python, the module or script it runs) and the runner's
stage process (``process.run(argv, log_path, env, watch, **callbacks)``: output piped to
the stage's log, the watch loop, the whole process tree stopped at the end). The base
``run`` wraps the argv (``_wrap``) and runs it through that process, so a launcher such as
torchrun inherits the log, the health watch, cancel and the tree stop. An executor that
does not start a local process (a batch scheduler) overrides ``run``.

Pure Python: the runner imports it, and so does a plugin on the laptop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class CannotRun(ValueError):
    """This executor cannot run this stage (one line saying what to write instead); the
    runner fails the stage with failure class ``config``."""


@dataclass
class Launch:
    """One process a stage runs, before an executor wraps it."""

    stage: str
    kind: str                      # "train" (the built-in trainer) or "command"
    argv: list[str]                # what the process executor starts
    env: dict[str, str] = field(default_factory=dict)
    python: str | None = None      # the interpreter, when a Python module or script is run
    module: str | None = None      # ``python -m MODULE ARGS``
    script: str | None = None      # ``python SCRIPT.py ARGS``
    args: list[str] = field(default_factory=list)  # ARGS of the module or script


class Executor:
    """A way of running a stage. Subclasses set ``name`` and fill ``_wrap`` (and ``_details``,
    ``check_options``); the public methods are what the runner calls."""

    name = ""
    options: tuple[str, ...] = ()  # the [stages.X] keys this executor reads
    settings: Any = None  # the run's settings (``settings.get("slurm")``), set when chosen

    def __init__(self, stage: str, table: dict[str, Any] | None = None):
        self.stage = stage
        self.table = dict(table or {})

    @classmethod
    def check_options(cls, stage: str, table: dict[str, Any]) -> None:
        """Raise ValueError (one line, saying what to write) for a bad option of ``stage``."""

    def describe(self) -> dict[str, Any]:
        """What ``state.json``, the summary and ``status`` show: the name and its settings."""
        return {"name": self.name, **self._details()}

    def wrap(self, launch: Launch) -> list[str]:
        """The argv that runs ``launch`` this way; ``CannotRun`` (one line) when it cannot
        (a ``_wrap`` may raise ValueError)."""
        try:
            return list(self._wrap(launch))
        except CannotRun:
            raise
        except ValueError as exc:
            raise CannotRun(str(exc)) from None

    def run(self, launch: Launch, process: Any, log_path: Any, watch: Any = None,
            **callbacks: Any) -> Any:
        """Run ``launch`` to its end through the runner's stage ``process``; its result.
        ``callbacks`` also has ``on_job(id)``, for an executor that submits a batch job."""
        callbacks.pop("on_job", None)
        return process.run(self.wrap(launch), log_path, launch.env, watch, **callbacks)

    def chain_key(self) -> str | None:
        """Consecutive stages whose executors give the same key are run together, by the
        first one's ``run_chain`` (a batch scheduler's chain of jobs submitted at once);
        None (the default): this stage runs on its own."""
        return None

    def run_chain(self, runner: Any, stages: list) -> tuple[bool, dict]:
        """Run ``stages`` (two or more, in order) as one chain; ``(ok, the last stage it
        ran)``. Only executors with a ``chain_key`` are asked."""
        raise NotImplementedError

    # -- for subclasses --------------------------------------------------------------------
    def _details(self) -> dict[str, Any]:
        return {}

    def _wrap(self, launch: Launch) -> list[str]:
        return launch.argv


__all__ = ["CannotRun", "Executor", "Launch"]
