"""Stage a full deploy's files while its tar still arrives, not after.

On a slow link the bundle takes seconds to arrive; staging it (decompress, write,
sha256 every file, make them durable) used to start only once the last byte was
in. ``EarlyStage`` runs ``incoming.extract`` in a thread on the upload's part file
as ``streamapply.receive_chunked`` writes it (``Follow``: a reader that waits for
more bytes until told the file is complete), into its own staging folder, for the
plan the server made before the upload. The guarantees are the ones of ``stage``:
every member checked against the manifest, every needed file's sha256 checked, all
of them durable before the journal (``result`` makes them durable, once the upload
they came from is removed). ``result`` hands the staged files to the apply
only when the plan made under the deploy lock needs exactly those files and the
whole upload arrived (all of its bytes); otherwise (or on any error) the
staging is dropped and the apply stages the complete upload as it always did. A
resumed upload (part of it from an earlier, cut request) is not staged early.
"""

from __future__ import annotations

import io
import shutil
import threading
from pathlib import Path

from remoteops.common.manifest import Manifest, iter_members
from remoteops.common.paths import link_of
from remoteops.server.durable import SYNCFS_MIN_FILES, syncfs
from remoteops.server.incoming import extract, make_staged_durable
from remoteops.server.stage_writers import mismatch


class Follow(io.RawIOBase):
    """A file another thread is still appending to: reads wait for more bytes until
    ``close_writer`` says it is complete (or ``fail`` that it never will be). The writer
    calls ``grew`` after each piece, so a reader that caught up goes on at once (a reader
    that slept and looked again lost up to 20 ms after the upload's last byte)."""

    WAIT = 0.05  # at most this long between looks, should a ``grew`` never come

    def __init__(self, path: Path):
        super().__init__()
        self._fh = open(path, "rb")
        self._complete = threading.Event()
        self._more = threading.Event()
        self._failed = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            done = self._complete.is_set()  # before reading: no byte written after is lost
            self._more.clear()  # before reading: a piece written after it wakes the wait
            n = self._fh.readinto(buffer)
            if n or done:
                return n or 0
            if self._failed:
                raise OSError("the upload stopped")
            self._more.wait(self.WAIT)

    def grew(self) -> None:
        self._more.set()

    def close_writer(self) -> None:
        self._complete.set()
        self._more.set()

    def fail(self) -> None:
        self._failed = True
        self._more.set()

    def close(self) -> None:
        self._fh.close()
        super().close()


class EarlyStage:
    """``extract`` of ``part`` (being written) for ``need``, in a thread (see the module).

    ``manifest`` None: a first deploy's tar arriving before its manifest
    (``server/stream_first``): every file in it is staged and its sha256 kept (``made``);
    ``adopt`` gives the manifest and plan when they come, and ``result`` checks each file
    against them before handing any over."""

    def __init__(self, manifest: Manifest | None, need: list[str] | None, part: Path,
                 staging: Path):
        self.manifest, self.staging, self.files = None, staging, None
        self.made: dict[str, tuple[str, int]] | None = {} if manifest is None else None
        if manifest is not None:
            self.adopt(manifest, need)
        self.staged: dict[str, Path] | None = None
        self.arrived = False
        shutil.rmtree(staging, ignore_errors=True)
        self._follow = Follow(part)
        self._thread = threading.Thread(target=self._run, args=(
            None if need is None else list(need),), daemon=True, name="remoteops-early-stage")
        self._thread.start()

    def adopt(self, manifest: Manifest, need: list[str]) -> None:
        """The manifest and the plan the staged files are for."""
        wanted = manifest.file_map()
        self.files = {p for p in need if link_of(wanted[p]) is None}
        self.manifest = manifest

    def _run(self, need: list[str] | None) -> None:
        try:
            self.staged = extract(self.manifest, iter_members(self.staging, self._follow),
                                  need, self.staging, durable=False,
                                  small_done=self._write_back, made=self.made)
        except Exception:  # noqa: BLE001 - the apply stages the whole upload again, and
            self.staged = None  # raises there what it finds
        finally:
            self._follow.close()

    def _write_back(self, staged: int) -> None:
        """The small files are staged and the large ones still arrive: start writing what
        is staged to disk now (``syncfs`` in a thread), so the sync that must follow the
        last file has little left to wait for (on the bench, 0.01-0.03 s instead of ~0.1 s
        when the large file still arrived). Only where that sync will be one ``syncfs``."""
        if staged >= SYNCFS_MIN_FILES:
            threading.Thread(target=syncfs, args=(self.staging,), daemon=True,
                             name="remoteops-early-sync").start()

    def grew(self) -> None:
        """More of the upload was written to the part file."""
        self._follow.grew()

    def complete(self) -> None:
        """The whole upload arrived (all of its bytes)."""
        self.arrived = True
        self._follow.close_writer()
        self._thread.join()

    def abandon(self) -> None:
        """The upload stopped: end the thread and drop what it staged."""
        self._follow.fail()
        self._follow.close_writer()
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
        if not self.arrived or self.staged is None or self.manifest is None or \
                manifest.content_id != self.manifest.content_id or files != self.files or \
                set(self.staged) != files:
            shutil.rmtree(self.staging, ignore_errors=True)
            return None
        for rel, (sha256, mode) in (self.made or {}).items():  # staged before the manifest
            if sha256 != wanted[rel].sha256 or mode != wanted[rel].mode:
                shutil.rmtree(self.staging, ignore_errors=True)
                raise mismatch(rel)
        if upload is not None:
            upload.unlink(missing_ok=True)
        make_staged_durable(self.staged, self.staging)
        return self.staged


__all__ = ["EarlyStage", "Follow"]
