"""One process of a stage, from its start to its whole tree stopped.

The process's output reaches the stage's log through a pipe that a thread here
copies (``_Pump``), so when a stage is stopped (failure, NaN, cancel) the tree
is frozen, what it wrote before is kept, and nothing it writes afterwards is
taken as its output. Each attempt is judged only on its own output (the bytes
after its header line). This is what the default ``process`` way of running a
stage does; the runner decides what to run and what the result means.
"""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Callable

from remoteops.server.pipeline import ChildResult, _die_with_parent
from remoteops.server.stagewatch import StageWatch


class _Pump(threading.Thread):
    """Copies a stage's output from its pipe to the log until muted or end of file."""

    def __init__(self, fd: int, log_path: Path):
        super().__init__(daemon=True)
        self.fd = fd
        self.log = open(log_path, "ab")
        self.lock = threading.Lock()
        self.muted = False

    def run(self) -> None:
        while True:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            with self.lock:
                if self.muted:
                    return
                if ready:
                    data = os.read(self.fd, 1 << 16)
                    if not data:
                        return
                    self.log.write(data)
                    self.log.flush()

    def drain_and_mute(self) -> None:
        """Keep what is in the pipe now (the tree is frozen), then take nothing more."""
        with self.lock:
            if self.muted:
                return
            for _ in range(1024):
                waiting = int.from_bytes(fcntl.ioctl(self.fd, termios.FIONREAD, b"\0" * 4),
                                         sys.byteorder)
                if waiting <= 0:
                    break
                data = os.read(self.fd, min(waiting, 1 << 20))
                if not data:
                    break
                self.log.write(data)
            self.log.flush()
            self.muted = True

    def close(self) -> None:
        self.drain_and_mute()
        self.join(5)
        os.close(self.fd)  # a writer still running now gets EPIPE
        self.log.close()


class StageProcess:
    """Runs a stage's processes one at a time; stops each one's whole tree at its end."""

    def __init__(self, cwd: Path, grace: float):
        self.cwd, self.grace = cwd, grace
        self.popen: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.popen is not None

    def run(self, args: list[str], log_path: Path, env: dict[str, str],
            watch: StageWatch | None = None, *, on_start: Callable[[int], None] = lambda pid: None,
            cancelled: Callable[[], bool] = lambda: False,
            on_change: Callable[[], None] = lambda: None) -> ChildResult:
        """Run ``args``; stop its whole tree on cancel, a bad verdict, or its end.

        ``watch`` judges the output, the stage's signals and its health window every
        second (``on_change`` when what it knows changed); ``cancelled`` is asked every
        0.2 s.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"\n==> {' '.join(args)}\n".encode())
            offset = log.tell()
        if watch is not None:
            watch.start(log_path, offset)
        read_fd, write_fd = os.pipe()
        try:
            self.popen = subprocess.Popen(args, cwd=str(self.cwd), stdin=subprocess.DEVNULL,
                                          stdout=write_fd, stderr=write_fd,
                                          env={**os.environ, **env},
                                          preexec_fn=_die_with_parent)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        on_start(self.popen.pid)
        pump = _Pump(read_fd, log_path)
        pump.start()
        try:
            killed_for, message = self._watch(watch, cancelled, on_change)
            stopped = self.stop_tree(pump)
            code = self.popen.wait()
        finally:
            pump.close()
        self.popen = None
        verdict = watch.final(code) if watch else None
        if killed_for or cancelled():
            why = killed_for or "cancelled"
            with open(log_path, "ab") as log:
                log.write(f"==> stopped ({why}): the stage's processes were ended"
                          f"{' (' + str(len(stopped)) + ' needed SIGKILL)' if stopped else ''}; "
                          "anything they wrote afterwards was discarded\n".encode())
        return ChildResult(code, killed_for, message, verdict)

    def _watch(self, watch: StageWatch | None, cancelled: Callable[[], bool],
               on_change: Callable[[], None]) -> tuple[str | None, str]:
        """Wait for the process to end, a cancel, or a bad verdict: ``(reason, message)``."""
        last_check = time.monotonic()
        while self.popen.poll() is None:
            time.sleep(0.2)
            if cancelled():
                break
            if watch and time.monotonic() - last_check > 1.0:
                last_check = time.monotonic()
                verdict = watch.poll()  # log, signals, health window
                if watch.changed:
                    on_change()
                if verdict is not None:  # a plugin rule's own reason too (policy: fail)
                    return verdict.reason, verdict.message
        return None, ""

    def stop_tree(self, pump: _Pump | None = None) -> list[int]:
        """End every process the stage started: our children (the stage's process, and its
        orphans re-parented to us) and all below them."""
        from remoteops.server.proctree import children_of, stop_tree

        child = self.popen
        roots = children_of(os.getpid())
        return stop_tree(roots, self.grace, on_frozen=pump.drain_and_mute if pump else None,
                         not_reaped={child.pid} if child is not None else set())


def last_error(log_path: Path) -> str:
    """The last ``error: `` line of a stage's log (the agent's one-line errors), else its
    last line."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "no log"
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors[-1][7:] if errors else (lines[-1] if lines else "no output"))[:300]
