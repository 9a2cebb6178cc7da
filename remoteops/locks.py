"""A lock file that names its holder; a stale lock of a dead process is broken safely."""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from pathlib import Path

from remoteops.errors import RemoteOpsError


class LockedError(RemoteOpsError):
    """Another process holds the lock."""


def pid_alive(pid: int | None) -> bool:
    """Whether a process of this machine is running (a zombie is not)."""
    if not pid or pid < 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class FileLock:
    """``with FileLock(path, "deploy v3"):`` -- exclusive, names holder/host/pid/time."""

    def __init__(self, path: Path, holder: str):
        self.path = Path(path)
        self.holder = holder
        self.broken: dict | None = None  # the stale lock we broke, if any

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {"holder": "unknown (unreadable lock)", "host": "?", "pid": -1, "time": "?"}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                "user": getpass.getuser(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                 time.gmtime())}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self.read()
                if held is None:
                    continue  # released meanwhile
                if self._stale(held):
                    # Rename first: of two breakers only one rename succeeds.
                    aside = self.path.with_name(f"{self.path.name}.stale-{held.get('pid')}")
                    try:
                        os.replace(self.path, aside)
                        aside.unlink()
                        self.broken = held
                    except FileNotFoundError:
                        pass
                    continue
                raise LockedError(
                    f"{self.path.parent.parent} is locked by {held.get('holder')} (pid "
                    f"{held.get('pid')} on {held.get('host')}, since {held.get('time')}); wait "
                    f"for it to finish, or if that process is gone remove {self.path}.")
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
                fh.flush()
                os.fsync(fh.fileno())
            return
        raise LockedError(f"could not take the lock {self.path}; try again.")

    def _stale(self, held: dict) -> bool:
        pid = held.get("pid")
        return (held.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0
                and not pid_alive(pid))

    def release(self) -> None:
        held = self.read()
        if held and held.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
