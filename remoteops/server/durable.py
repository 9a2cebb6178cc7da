"""Many new files made durable at once: one ``syncfs(2)`` instead of an fsync each.

Staging a 2,000-file deploy wrote every file, then fsynced each one and each folder (from
16 threads); that was the largest part of the server's time. ``syncfs`` on the staging
folder's file system writes back every dirty page and inode there and waits, with one
journal commit: the same guarantee (every staged byte and name is on disk before the
journal is written), measured here at 0.05-0.12 s instead of 0.42-0.58 s for 2,000
files of 20 KB. It is used only where it reports errors (Linux 5.8 and later: earlier
kernels return 0 even when the write-back failed), only when the files and folders are
on that file system, and only for many files (for a few, their own fsyncs write less).
Anywhere else, or when it fails, each file and folder is fsynced as before.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from remoteops.common.files import fsync_dirs, fsync_path

SYNCFS_MIN_FILES = 64
FSYNC_THREADS = 16


def make_durable(files: list[Path], folders: set[Path], anchor: Path) -> str:
    """Make ``files`` and the entries of ``folders`` durable; ``anchor``: a folder that
    holds them all. Returns how: ``"syncfs"`` or ``"fsync"``."""
    if len(files) >= SYNCFS_MIN_FILES and _one_device(anchor, folders) and syncfs(anchor):
        return "syncfs"
    fsync_all(files)
    fsync_dirs(folders)
    return "fsync"


WRITEBACK_EVERY = 8 << 20


class Writeback:
    """Starts writing a large file's pages to disk while it is still being written, so the
    ``syncfs``/fsync that must follow has little left to wait for: a 100 MB file's share
    of a full deploy's syncfs went from ~0.05 s to nearly nothing, at no measured cost to
    the writing. ``posix_fadvise(DONTNEED)`` on what is written starts an asynchronous
    write-back of those pages (nothing waits for it; the guarantee is still the final
    sync's) and drops them from the page cache once clean."""

    def __init__(self, fh):
        self.fh, self.written, self.started = fh, 0, 0

    def wrote(self, n: int) -> None:
        self.written += n
        if self.written - self.started >= WRITEBACK_EVERY:
            try:
                self.fh.flush()
                os.posix_fadvise(self.fh.fileno(), self.started, self.written - self.started,
                                 os.POSIX_FADV_DONTNEED)
            except (OSError, AttributeError):  # advice only: the final sync still decides
                pass
            self.started = self.written


def fsync_all(paths: list[Path]) -> None:
    """fsync every file in ``paths`` (concurrently: fsync releases the GIL, and concurrent
    fsyncs share the file system's journal commits)."""
    if len(paths) < 4:
        for path in paths:
            fsync_path(path)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(FSYNC_THREADS, len(paths))) as pool:
        list(pool.map(fsync_path, paths))  # list(): re-raises the first error


def _one_device(anchor: Path, folders: set[Path]) -> bool:
    try:
        dev = os.stat(anchor).st_dev
        return all(os.stat(f).st_dev == dev for f in folders)
    except OSError:
        return False


def _reports_errors() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


def syncfs(folder: Path) -> bool:
    """``syncfs(2)`` on ``folder``'s file system; False where it is missing, cannot report
    a failed write-back, or failed (the caller then fsyncs file by file)."""
    if not _reports_errors():
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return call(fd) == 0
    finally:
        os.close(fd)


__all__ = ["make_durable", "fsync_all", "syncfs", "SYNCFS_MIN_FILES", "Writeback"]
