"""A lock that cannot be held twice (an OS file lock) and names its holder; process identity.

The kernel's ``flock`` on an open file is the truth: it is released when its
holder dies, so a "stale" lock needs no breaking and two processes can never
both hold it. The file's text only names the holder (holder, host, pid, user,
time) for messages. The file is removed on release, and a taker checks that
the file it locked is still the one at the path, so a release racing a take
cannot give the lock to two processes.

A pid alone is no identity: pids are reused. ``process_identity`` adds the
start time (``/proc/<pid>/stat`` field 22) and the boot id, which together
name one process for ever.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import socket
import time
from pathlib import Path

from remoteops.common.clock import now_iso
from remoteops.common.errors import RemoteOpsError


class LockedError(RemoteOpsError):
    """Another process holds the lock."""


# -- process identity ------------------------------------------------------------------------

def stat_fields(pid: int | str) -> list[str] | None:
    """``/proc/<pid>/stat`` from field 3 (state) on, or None when it cannot be read.

    The command name (field 2) may hold spaces and ')': the split is after its last ')'.
    """
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def pid_alive(pid: int | None) -> bool:
    """Whether a process of this machine is running (a zombie is not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = stat_fields(pid)
    return fields[0] not in ("Z", "X") if fields else True


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    try:
        return int(stat_fields(pid)[19])  # fields[0] is field 3 (state)
    except (TypeError, IndexError, ValueError):
        return None


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return None


def process_identity(pid: int | None = None) -> dict:
    """What names one process for ever: host, pid, start time and boot id."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid),
            "boot": boot_id()}


def identity_alive(ident: dict | None) -> bool | None:
    """Whether the process ``ident`` names still runs; None when it is on another host.

    Without a recorded start time (state written by an older version) the pid alone decides.
    """
    if not ident:
        return False
    if ident.get("host") not in (None, socket.gethostname()):
        return None
    pid = ident.get("pid")
    if not pid_alive(pid):
        return False
    if ident.get("boot") and ident["boot"] != boot_id():
        return False
    start = ident.get("start")
    return start is None or process_start(pid) == start


# -- the lock --------------------------------------------------------------------------------

def _decode(raw: bytes) -> dict | None:
    if not raw.strip():
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return {"holder": "unknown (unreadable lock)", "host": "?", "pid": -1, "time": "?"}
    return data


def _legacy_alive(held: dict | None) -> bool:
    """A lock file written by a version without ``flock`` whose pid still runs here."""
    return bool(held) and not held.get("flock") and held.get("host") == socket.gethostname() \
        and isinstance(held.get("pid"), int) and pid_alive(held["pid"])


class FileLock:
    """``with FileLock(path, "deploy v3"):`` -- exclusive, names holder/host/pid/time."""

    TRIES = 10  # a probe (held_by) holds the lock shared for microseconds: retry briefly

    def __init__(self, path: Path, holder: str, fd: int | None = None):
        self.path = Path(path)
        self.holder = holder
        self.fd = fd  # open and flock'ed while we hold it
        self.broken: dict | None = None  # details left by a holder that died holding it

    def read(self) -> dict | None:
        """The holder's details as written in the file (None: no lock file)."""
        try:
            return _decode(self.path.read_bytes())
        except FileNotFoundError:
            return None

    def held_by(self) -> dict | None:
        """Who holds the lock now (its details), or None when it is free."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self.read() or {"holder": "unknown (starting)", "host": "?", "pid": -1,
                                       "time": "?"}
            held = _decode(os.pread(fd, 1 << 16, 0))
            return held if _legacy_alive(held) else None
        finally:
            os.close(fd)  # also drops our shared lock

    def _locked_error(self, held: dict | None) -> LockedError:
        held = held or {"holder": "unknown (starting)", "pid": "?", "host": "?", "time": "?"}
        return LockedError(
            f"{self.path.parent.parent} is locked by {held.get('holder')} (pid "
            f"{held.get('pid')} on {held.get('host')}, since {held.get('time')}); wait for it "
            "to finish and try again.")

    def acquire(self) -> None:
        if self.fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(self.TRIES):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if attempt == self.TRIES - 1:
                    raise self._locked_error(self.read()) from None
                time.sleep(0.02)
                continue
            if not self._same_file(fd):  # released (and removed) between our open and flock
                os.close(fd)
                continue
            held = _decode(os.pread(fd, 1 << 16, 0))
            if _legacy_alive(held):
                os.close(fd)
                raise self._locked_error(held)
            self.fd = fd
            self.broken = held if held and held.get("holder") else None
            self.update()
            return
        raise LockedError(f"could not take the lock {self.path}; try again.")

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def update(self, **extra) -> None:
        """(Re)write the holder's details; ``extra`` may name another process (a hand-over)."""
        info = {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                "user": getpass.getuser(), "time": now_iso(), "flock": True,
                "identity": process_identity()}
        info.update(extra)
        data = json.dumps(info).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        # Not fsynced: the flock is the truth and dies with the machine; the text is only
        # for messages. On ext4 an fsync commits the journal, and with it the writes of
        # every file staged so far: 37 ms of a full deploy's apply, and far more on a
        # server busy writing checkpoints.

    def release(self) -> None:
        """Remove the file, then unlock (in that order: see the module's docstring)."""
        if self.fd is None:
            return
        try:
            if self._same_file(self.fd):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None

    def hand_over(self) -> int:
        """The locked descriptor, made inheritable for a child that keeps the lock."""
        os.set_inheritable(self.fd, True)
        return self.fd

    def let_go(self) -> None:
        """Close our descriptor without unlocking it for a child that shares it."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
