"""A command stage: its command line and environment, how its result is read, its outputs.

``{stage}``, ``{run_dir}`` and ``{project_root}`` in the command are replaced,
shell-quoted; any other brace (``${HOME}``, an awk program) is left alone. The
command learns its stage from the environment too (``REMOTEOPS_STAGE``,
``REMOTEOPS_RUN_DIR``, ``REMOTEOPS_PROJECT_ROOT``), which ``remoteops.hooks``
reads.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

from remoteops.common.runs import stage_outputs
from remoteops.server.pipeline import ChildResult

PLACEHOLDER = re.compile(r"\{(stage|run_dir|project_root)\}")


def expand_command(template: str, **values: str) -> str:
    """Replace ``{stage}``, ``{run_dir}``, ``{project_root}``, shell-quoted; nothing else."""
    return PLACEHOLDER.sub(lambda m: shlex.quote(str(values[m.group(1)])), template)


def prepare(settings, table: dict, stage: str, run_dir: Path, root: Path
            ) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """``(argv, environment, log-watch settings)``; ValueError (a config error) for a bad
    ``loss_pattern``."""
    command = expand_command(str(table["command"]), stage=stage, run_dir=str(run_dir),
                             project_root=str(root))
    pattern = table.get("loss_pattern") or settings["health.loss_pattern"] or None
    if pattern:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"the loss_pattern {pattern!r} is not a valid regular expression "
                             f"({exc}); fix it in remoteops.toml") from None
    env = {"REMOTEOPS_STAGE": stage, "REMOTEOPS_RUN_DIR": str(run_dir),
           "REMOTEOPS_PROJECT_ROOT": str(root)}
    if table.get("dataset_live"):  # the same live set the built-in trainer reads
        from remoteops.common.live_set import live_env
        env.update(live_env(root, table))
    log = {"pattern": pattern, "loss_max": float(settings["health.loss_max"]),
           "explode_ratio": float(settings["health.explode_ratio"]),
           "overflow_steps": int(settings["health.grad_overflow_steps"])}
    return ["bash", "-c", command], env, log


_PYTHON = re.compile(r"(.*/)?python(\d+(\.\d+)?)?")
_SHELL = set(";|&<>`$()")


def python_program(command: str) -> tuple[str, str | None, str | None, list[str]] | None:
    """``(interpreter, module, script, args)`` when the (expanded) command runs one Python
    program (``python X.py ARGS``, ``X.py ARGS``, ``python -m MOD ARGS``), else None: a
    launcher such as torchrun can then start that program itself."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if not words or any(ch in _SHELL for w in words for ch in w) or "=" in words[0]:
        return None  # a pipe, a list, a redirection or a variable: a shell program
    if words[0].endswith(".py"):
        return sys.executable, None, words[0], words[1:]
    if not _PYTHON.fullmatch(words[0]) or len(words) < 2:
        return None
    if words[1] == "-m" and len(words) > 2:
        return words[0], words[2], None, words[3:]
    if words[1].endswith(".py"):
        return words[0], None, words[1], words[2:]
    return None


def judge(result: ChildResult) -> tuple[bool, str | None, str | None]:
    """``(ok, failure class, reason)`` of a finished command."""
    if result.killed_for:
        return False, result.killed_for, result.message
    verdict = result.verdict
    if verdict is not None and not verdict.ok:
        return False, verdict.reason, verdict.message
    if result.code != 0:
        return False, "process_died", f"the command exited with {result.code}"
    return True, None, None


def record_outputs(root: Path, stage: dict, table: dict) -> None:
    """The command stage's declared outputs, project-relative, for collect."""
    outs = stage_outputs(stage["name"], table)
    stage["outputs"]["declared"] = outs
    missing = [p for p in outs if not (root / p).exists()]
    for path in missing if "outputs" in table else []:
        stage["warnings"].append(f"declared output {path} was not produced")
