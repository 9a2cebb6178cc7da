"""Where the server side lives: the ``Target`` interface and ``LocalTarget`` (this machine).

``SSHTarget`` (Fabric) is in ``remoteops.laptop.targets``; ``LocalTarget`` is here because
both sides use it: the laptop for ``--host local``, the server's precheck stage for itself.

Both expose one small interface: ``run`` a shell command, ``run_python`` a
script whose payload travels on stdin (never in ``ps``) and whose JSON answer
survives login-shell banners, ``put``/``get`` files
(SFTP, never the shell), and ``read_bytes``/``write_bytes`` (atomic). The base
class owns the cross-cutting work (timing, errors); subclasses fill in the
``_methods``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shlex
import shutil
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remoteops.common.files import write_atomic_bytes
from remoteops.common.errors import RemoteCommandError, timed_out
from remoteops.common.wire import _BOOTSTRAP, BEGIN, END, PAYLOAD_MARK, parse_marked  # noqa: F401

log = logging.getLogger(__name__)


class AgentMissing(RemoteCommandError):
    """The target's Python has no remoteops installed."""


@dataclass
class Result:
    stdout: str
    stderr: str
    exited: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exited == 0


def shell_path(path: str) -> str:
    """Quote a path for the shell, keeping a leading ``~/`` expandable."""
    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


class Target:
    """The interface every target offers. Subclasses implement the ``_methods``."""

    kind = "target"

    def __init__(self, name: str, project_root: str, python: str = "python3",
                 command_timeout: float = 300.0):
        self.name = name
        self.project_root = project_root
        self.python = python
        self.command_timeout = command_timeout

    # -- public API: cross-cutting work here, specifics in _methods -----------
    def run(self, command: str, *, timeout: float | None = None, check: bool = True,
            stdin: str | None = None) -> Result:
        """Run ``command`` in the login shell; ``stdin`` (if given) is its whole input."""
        started = time.monotonic()
        stdout, stderr, code = self._run(command, timeout or self.command_timeout, stdin)
        result = Result(stdout, stderr, code, time.monotonic() - started)
        log.debug("%s: %r exited %s in %.2fs", self.name, command[:120], code, result.seconds)
        if check and code != 0:
            tail = (stderr.strip() or stdout.strip()).splitlines()[-1:] or ["no output"]
            raise RemoteCommandError(f"command failed on {self.name} (exit {code}): {tail[0]}")
        return result

    def run_python(self, source: str, payload: Any = None, *, timeout: float | None = None) -> Any:
        """Run ``source`` with the target's Python in one round trip; return its ``result``."""
        blob = base64.b64encode(zlib.compress(json.dumps(
            {"source": source, "payload": payload}).encode(), 9)).decode()
        script = _BOOTSTRAP.format(mark=PAYLOAD_MARK, skip=len(PAYLOAD_MARK), begin=BEGIN,
                                   end=END)
        command = f"{shell_path(self.python)} -c {shlex.quote(script)}"
        result = self.run(command, timeout=timeout, check=False,
                          stdin=f"{PAYLOAD_MARK}{blob}\n")
        if result.exited == 127 or "No such file" in result.stderr and result.exited != 0:
            raise RemoteCommandError(
                f"'{self.python}' was not found on {self.name}; set remote_python (or "
                f"hosts.<name>.remote_python) to the server's Python.")
        if result.exited != 0:
            tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
            raise RemoteCommandError(f"Python on {self.name} failed (exit {result.exited}): "
                                     f"{tail[0]}")
        return parse_marked(result.stdout)

    def put(self, local: str | os.PathLike, remote: str) -> None:
        self._put(Path(local), remote)

    def get(self, remote: str, local: str | os.PathLike) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self._get(remote, Path(local))

    def read_bytes(self, path: str) -> bytes:
        return self._read_bytes(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write atomically: a temporary name in the same folder, then rename."""
        self._write_bytes(path, data)

    def size(self, path: str) -> int | None:
        """Size of a file on the target, or None when it does not exist."""
        return self._size(path)

    def open_append(self, path: str):
        """A binary file object appending to ``path`` (created with its folders if missing)."""
        return self._open_append(path)

    def rename(self, src: str, dst: str) -> None:
        self._rename(src, dst)

    def open_read(self, path: str, offset: int = 0):
        """A binary file object reading ``path`` from ``offset``."""
        return self._open_read(path, offset)

    def remove(self, path: str) -> None:
        self._remove(path)

    def run_agent(self, *args: str, timeout: float | None = None) -> Any:
        """Run ``remoteops-agent ARGS --json`` with the target's Python; return its JSON."""
        command = " ".join([shell_path(self.python), "-m", "remoteops.agent",
                            *(shell_path(a) for a in args), "--json"])
        result = self.run(command, timeout=timeout, check=False)
        return self.agent_answer(result.stdout, result.stderr, result.exited)

    def agent_answer(self, stdout: str, stderr: str, code: int) -> Any:
        """The JSON an agent command printed, or its error (``run_agent``)."""
        if code != 0:
            errors = [l[len("error: "):] for l in stderr.splitlines() if l.startswith("error: ")]
            if errors:
                raise RemoteCommandError(errors[-1])
            if "No module named remoteops" in stderr or "No module named 'remoteops'" in stderr:
                raise AgentMissing(f"remoteops is not installed for {self.python} on {self.name}")
            tail = stderr.strip().splitlines()[-1:] or ["no output"]
            raise RemoteCommandError(f"the agent on {self.name} failed (exit {code}): {tail[0]}")
        return parse_marked(stdout)

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return self.name

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- to implement ---------------------------------------------------------
    def _run(self, command: str, timeout: float, stdin: str | None) -> tuple[str, str, int]:
        raise NotImplementedError

    def _put(self, local: Path, remote: str) -> None:
        raise NotImplementedError

    def _get(self, remote: str, local: Path) -> None:
        raise NotImplementedError

    def _read_bytes(self, path: str) -> bytes:
        raise NotImplementedError

    def _write_bytes(self, path: str, data: bytes) -> None:
        raise NotImplementedError

    def _size(self, path: str) -> int | None:
        raise NotImplementedError

    def _open_append(self, path: str):
        raise NotImplementedError

    def _rename(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def _remove(self, path: str) -> None:
        raise NotImplementedError

    def _open_read(self, path: str, offset: int):
        raise NotImplementedError


class LocalTarget(Target):
    """The server side on this machine: same interface, no SSH."""

    kind = "local"

    def _run(self, command: str, timeout: float, stdin: str | None) -> tuple[str, str, int]:
        feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
        try:
            proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                  timeout=timeout, **feed)
        except subprocess.TimeoutExpired:
            raise timed_out(timeout, self.name) from None
        return proc.stdout, proc.stderr, proc.returncode

    def _path(self, path: str) -> Path:
        return Path(os.path.expanduser(path))

    def _put(self, local: Path, remote: str) -> None:
        dest = self._path(remote)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dest)

    def _get(self, remote: str, local: Path) -> None:
        shutil.copyfile(self._path(remote), local)

    def _read_bytes(self, path: str) -> bytes:
        return self._path(path).read_bytes()

    def _write_bytes(self, path: str, data: bytes) -> None:
        write_atomic_bytes(self._path(path), data)

    def _size(self, path: str) -> int | None:
        try:
            return self._path(path).stat().st_size
        except FileNotFoundError:
            return None

    def _open_append(self, path: str):
        dest = self._path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return open(dest, "ab")

    def _rename(self, src: str, dst: str) -> None:
        os.replace(self._path(src), self._path(dst))

    def _remove(self, path: str) -> None:
        self._path(path).unlink(missing_ok=True)

    def _open_read(self, path: str, offset: int):
        fh = open(self._path(path), "rb")
        fh.seek(offset)
        return fh


__all__ = ["Target", "LocalTarget", "Result", "AgentMissing", "shell_path"]
