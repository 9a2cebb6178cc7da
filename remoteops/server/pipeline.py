"""The server's part of starting a run: finish an interrupted apply first, then spawn the
runner detached (new session, no terminal, output to a file) as ``python -m remoteops.agent``.

Run state, planning and the pipeline lock are ``remoteops.common.runs``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


def finish_pending_apply(project_root: Path) -> dict | None:
    """Undo an interrupted deploy or rollback before a run reads the tree (under the deploy
    lock, so a deploy in progress is never undone); refuses while a deploy runs."""
    from remoteops.server.apply import Project

    project = Project(project_root)
    if not (project.state / "journal.json").is_file():
        return None
    with project.lock("pipeline-start (recovering an interrupted change)"):
        return project.recover()


# -- child processes -------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child: get SIGTERM when the runner dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class ChildResult:
    code: int
    killed_for: str | None = None  # a log-watch verdict that made us stop it
    message: str = ""
    verdict: object = None  # the log verdict on this attempt's own output (watched commands)


def spawn_detached(args: list[str], log_path: Path, cwd: Path,
                   pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start ``args`` in a new session with no terminal, output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Without the SSH session's variables: bash sees SSH_CLIENT and sources ~/.bashrc for
    # every `bash -c` a stage runs (a conda or pyenv init costs seconds each time).
    env = {k: v for k, v in os.environ.items()
           if k not in ("SSH_CLIENT", "SSH2_CLIENT", "SSH_CONNECTION", "SSH_TTY")}
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True, pass_fds=pass_fds, env=env)


def agent_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "remoteops.agent", *args]


__all__ = ["finish_pending_apply", "spawn_detached", "agent_args", "ChildResult"]
