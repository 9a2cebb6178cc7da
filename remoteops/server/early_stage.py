"""Stage a full deploy's files while its tar still arrives, not after.

On a slow link the bundle takes seconds to arrive; staging it (decompress, write,
sha256 every file, make them durable) used to start only once the last byte was
in. ``EarlyStage`` runs ``incoming.extract`` in a thread on the upload's bytes as
``streamapply.receive_chunked`` receives them (``Feed``: handed over in memory, not
read back from the part file the receiver writes for a resume), into its own
staging folder, for the plan the server made before the upload. The guarantees are the ones of ``stage``:
every member checked against the manifest, every needed file's sha256 checked, all
of them durable before the journal (``result`` makes them durable, once the upload
they came from is removed). ``result`` hands the staged files to the apply
only when the plan made under the deploy lock needs exactly those files and the
whole upload arrived with its sha256 right; otherwise (or on any error) the
staging is dropped and the apply stages the complete upload as it always did. A
resumed upload (part of it from an earlier, cut request) is not staged early.
"""

from __future__ import annotations

import collections
import io
import shutil
import threading
from pathlib import Path

from remoteops.common.manifest import Manifest, iter_members
from remoteops.common.paths import link_of
from remoteops.server.incoming import extract, make_staged_durable


class Feed(io.RawIOBase):
    """The upload's bytes handed over by the receiving thread (``put``) as they arrive, read
    in order without a trip through the part file (which the receiver still writes, for a
    resume). Reads wait for more until ``close_writer`` says the upload is complete (or
    ``fail`` that it never will be); ``put`` waits while ``LIMIT`` bytes are unread, and
    drops its bytes once the reader has stopped (``close``)."""

    LIMIT = 32 << 20

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition()
        self._chunks: collections.deque = collections.deque()
        self._unread = 0
        self._complete = self._failed = self._reader_gone = False

    def readable(self) -> bool:
        return True

    def put(self, data: bytes) -> None:
        with self._cond:
            while self._unread >= self.LIMIT and not self._reader_gone:
                self._cond.wait()
            if self._reader_gone or not data:
                return
            self._chunks.append(data)
            self._unread += len(data)
            self._cond.notify_all()

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (those of one ``put`` at most); b"" once complete."""
        with self._cond:
            while not self._chunks and not self._complete and not self._failed:
                self._cond.wait()
            if self._failed:
                raise OSError("the upload stopped")
            if not self._chunks:
                return b""
            chunk = self._chunks.popleft()
            if 0 <= size < len(chunk):
                self._chunks.appendleft(chunk[size:])
                chunk = chunk[:size]
            self._unread -= len(chunk)
            self._cond.notify_all()
            return chunk

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close_writer(self) -> None:
        with self._cond:
            self._complete = True
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._reader_gone = True
            self._chunks.clear()
            self._unread = 0
            self._cond.notify_all()
        super().close()


class EarlyStage:
    """``extract`` of ``part`` (being written) for ``need``, in a thread (see the module)."""

    def __init__(self, manifest: Manifest, need: list[str], staging: Path):
        self.manifest, self.staging = manifest, staging
        wanted = manifest.file_map()
        self.files = {p for p in need if link_of(wanted[p]) is None}
        self.staged: dict[str, Path] | None = None
        self.arrived = False
        shutil.rmtree(staging, ignore_errors=True)
        self._feed = Feed()
        self._thread = threading.Thread(target=self._run, args=(list(need),), daemon=True,
                                        name="remoteops-early-stage")
        self._thread.start()

    def _run(self, need: list[str]) -> None:
        try:
            self.staged = extract(self.manifest, iter_members(self.staging, self._feed),
                                  need, self.staging, durable=False)
        except Exception:  # noqa: BLE001 - the apply stages the whole upload again, and
            self.staged = None  # raises there what it finds
        finally:
            self._feed.close()

    def arriving(self, data: bytes) -> None:
        """The next bytes of the upload (``streamapply.receive_chunked`` hands them over)."""
        self._feed.put(data)

    def complete(self) -> None:
        """The whole upload arrived and its sha256 matched."""
        self.arrived = True
        self._feed.close_writer()
        self._thread.join()

    def abandon(self) -> None:
        """The upload stopped: end the thread and drop what it staged."""
        self._feed.fail()
        self._thread.join()
        shutil.rmtree(self.staging, ignore_errors=True)

    def discard(self) -> None:
        """Drop what is staged here (after the apply moved what it used)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def result(self, manifest: Manifest, need: list[str],
               upload: Path | None = None) -> dict[str, Path] | None:
        """The staged files, made durable, when they are what this apply needs (else None).
        ``upload``: the tar they came from, removed first when they are used: nothing
        reads it again, and a file removed before ``syncfs`` is never written to disk
        (a full deploy's upload is most of what that call would write otherwise)."""
        wanted = manifest.file_map()
        files = {p for p in need if link_of(wanted[p]) is None}
        if not self.arrived or self.staged is None or manifest.content_id != \
                self.manifest.content_id or files != self.files or set(self.staged) != files:
            shutil.rmtree(self.staging, ignore_errors=True)
            return None
        if upload is not None:
            upload.unlink(missing_ok=True)
        make_staged_durable(self.staged, self.staging)
        return self.staged


__all__ = ["EarlyStage", "Feed"]
