"""Small staged files written by a few threads while the upload is still read.

A full deploy of a project is mostly small files, and each costs the server a create (the
file system's inode allocation), a write and a sha256: one after the other in the thread
that reads the tar, that was the slowest part of staging a 2,000-file deploy while it
arrives (it finished ~0.45 s after the last byte on the bench, with a core idle). These
calls release the GIL, so a few threads overlap them with each other and with reading
the next members. Every file's sha256 is checked before it is written; the first error
is raised by the next ``put`` or by ``finish``.

The files of one folder all go to the same thread: creating a file holds its folder's lock
for the inode allocation, and a second thread creating in the same folder spins on that
lock (it burnt ~0.25 CPU-s per 2,000-file deploy on a 2-core server, a third of the
writers' time, when every thread took from one queue).

What waits to be written is bounded by bytes (``AHEAD``), not by a count per thread: a tar
holds a folder's files one after the other, so with 16 files per queue the reading thread
stopped at the first full folder while the other writers had nothing to do, and after the
last byte had arrived the rest of staging ran on one core.

Two threads, not four: once the files deleted in the last 30 s no longer slowed every create
(an ext4 without a journal, see ``tests/bench/bench_deploy.py``), four threads cost more in
handoffs than they overlapped. Full deploys, interleaved, 2-core VM: 1.23 s and 1.75 CPU-s
with two, 1.31 s and 1.83 CPU-s with four (12 rounds); right after a delete, 1.40 s vs
1.43 s (8 rounds).

None on a server with two cores or fewer (``writer_threads``): each file is then written by
the reading thread. On the bench's journalled ext4 the handoffs (queues, conditions, the
GIL passed back and forth per file) cost more than they overlapped even with a core free:
staging the bench bundle alone took 0.38 CPU-s and 0.40 s inline against 0.55 CPU-s and
0.44 s with two threads (10 rounds, interleaved); and in a full deploy both cores are busy
anyway (ssh, the upload, the unpacking).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from pathlib import Path

from remoteops.common.manifest import BundleError

SMALL = 1 << 20  # members up to this size are read whole and handed to the writers
THREADS = 2  # where there are more than two cores
AHEAD = 32 << 20  # bytes handed over and not yet written, at most (one file more if larger)


def mismatch(rel: str) -> BundleError:
    return BundleError(f"{rel} in the upload does not match its sha256 (tampered or "
                       "damaged); nothing was changed: rebuild and deploy again.")


def writer_threads() -> int:
    """How many writing threads this server gets: ``THREADS``, or none (inline) on two
    cores or fewer (see the module)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return THREADS if cores > 2 else 0


class StageWriters:
    def __init__(self, threads: int | None = None, ahead: int = AHEAD) -> None:
        threads = writer_threads() if threads is None else threads
        self._queues: list[queue.Queue] = [queue.Queue() for _ in range(threads)]
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._room = threading.Condition()  # ``_held`` went down
        self._held, self._ahead = 0, ahead
        self._threads = [threading.Thread(target=self._run, args=(q,), daemon=True,
                                          name="remoteops-stage-writer")
                         for q in self._queues]
        for thread in self._threads:
            thread.start()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, rel: str, out: Path, sha256: str | None, data: bytes, mode: int = 0o644,
            made: dict | None = None) -> None:
        """Write ``data`` to ``out`` (its folder exists) with ``mode``, once its sha256 is
        checked (now, when there are no threads). ``sha256`` None: not known yet, the one
        made goes to ``made[rel]`` (with the mode) to be checked later."""
        self.check()
        if not self._queues:
            _write(rel, out, sha256, data, mode, made)
            return
        size = len(data) + 1  # an empty file counts too
        with self._room:
            while self._held and self._held + size > self._ahead and self._error is None:
                self._room.wait()
            self._held += size
        folder = self._queues[hash(out.parent) % len(self._queues)]
        folder.put((rel, out, sha256, data, mode, made))

    def finish(self) -> None:
        """Everything is handed over: wait for the writing; raise its first error."""
        self.stop()
        self.check()

    def stop(self) -> None:
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join()

    def _run(self, work: queue.Queue) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            rel, out, sha256, data, mode, made = item
            try:
                if self._error is None:  # after an error: drained until the end
                    _write(rel, out, sha256, data, mode, made)
            except BaseException as exc:  # noqa: BLE001 - raised in the reading thread
                with self._lock:
                    if self._error is None:
                        self._error = exc
            finally:
                with self._room:
                    self._held -= len(data) + 1
                    self._room.notify()


def _write(rel: str, out: Path, sha256: str | None, data: bytes, mode: int,
           made: dict | None = None) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is None:
        made[rel] = (digest, mode)
    elif digest != sha256:
        raise mismatch(rel)
    with open(out, "wb") as dst:
        dst.write(data)
        os.fchmod(dst.fileno(), mode)


__all__ = ["StageWriters", "SMALL", "AHEAD", "mismatch", "writer_threads"]
