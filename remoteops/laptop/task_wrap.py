"""What every task is wrapped in: one-line errors, and ``TASK --help`` that always helps.

invoke hands the token after a task with a required positional argument to that
argument, so ``invoke rollback --help`` would roll back to a backup named
``--help``. :func:`friendly` prints the task's help instead.
"""

from __future__ import annotations

import functools
import os
import traceback
from typing import Any, Callable

from invoke.exceptions import Exit

from remoteops.common.errors import RemoteOpsError

HELP_FLAGS = ("--help", "-h")


def help_asked(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """True when an argument's value (the context aside) is ``--help`` or ``-h``."""
    return any(isinstance(arg, str) and arg in HELP_FLAGS
               for arg in (*args[1:], *kwargs.values()))


def show_help(task_name: str) -> None:
    """Print the task's help exactly as ``remoteops --help TASK`` does."""
    from remoteops.laptop.main import program

    program.run(["remoteops", "--help", task_name.replace("_", "-")], exit=False)


def friendly(func: Callable) -> Callable:
    """Print a RemoteOpsError as one line and exit non-zero (REMOTEOPS_DEBUG=1: traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if help_asked(args, kwargs):
            return show_help(func.__name__)
        try:
            return func(*args, **kwargs)
        except RemoteOpsError as exc:
            if os.environ.get("REMOTEOPS_DEBUG"):
                traceback.print_exc()
            raise Exit(f"error: {exc}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None

    return wrapper


__all__ = ["friendly", "help_asked", "show_help"]
