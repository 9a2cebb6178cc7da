"""Files the server names, written on the laptop and confined to one folder of the project.

The names come from the server, so they are hostile until checked: each must be a
plain relative POSIX path under ``outputs/`` (or a stage output that the laptop's own
config declares) with no empty, ``.`` or ``..`` part.
No folder on the way and no destination may be a symbolic link: every component
is opened relative to its parent with ``O_NOFOLLOW`` (no check-then-use race), a
file is written to a temporary name in that real folder and renamed into place,
and a rename replaces a name, it never follows it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Iterator, Sequence

from remoteops.common.files import sha256_fileobj
from remoteops.common.errors import RemoteOpsError

AREA = "outputs"  # the only folder of the project that collect may write
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class UnsafePath(RemoteOpsError):
    """The server named a path collect must not write."""


def _refuse(rel: object, why: str) -> UnsafePath:
    return UnsafePath(f"collect refused the server's path {rel!r}: {why}; nothing was "
                      f"collected (collect writes only under {AREA}/ and the outputs that the "
                      "stages in your remoteops.toml declare). Check the server, or declare "
                      "that output in the stage's outputs = [...].")


def safe_parts(rel: object, areas: Sequence[str] = (AREA,)) -> list[str]:
    """The path's components, if it is a normalised relative path under ``outputs/``, or
    equal to or under one of the other ``areas`` (the stages' declared outputs)."""
    if not isinstance(rel, str) or not rel:
        raise _refuse(rel, "not a path")
    if "\\" in rel or not rel.isprintable():
        raise _refuse(rel, "a control character or a backslash in the name")
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise _refuse(rel, "an absolute path")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise _refuse(rel, "'..', '.' or an empty part in the path")
    for area in areas:
        own = area.split("/")
        if parts[:len(own)] == own and (len(parts) > len(own) or area != AREA):
            return parts
    raise _refuse(rel, f"outside {AREA}/ and the stages' declared outputs")


def _open_dir(fd: int, name: str, rel: str, create: bool) -> int | None:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise _refuse(rel, f"{name!r} on the way is a symbolic link or not a folder on "
                               "this machine") from None
        raise
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o777, dir_fd=fd)
    return _open_dir(fd, name, rel, False)


@contextlib.contextmanager
def folder(base: Path, parts: list[str], create: bool) -> Iterator[int | None]:
    """A descriptor of the folder holding ``parts[-1]`` under ``base``, no link followed.

    None when a folder is missing and ``create`` is false."""
    rel = "/".join(parts)
    fd: int | None = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in parts[:-1]:
            sub = _open_dir(fd, name, rel, create)
            os.close(fd)
            fd = sub
            if fd is None:
                break
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _check_dest(fd: int, name: str, rel: str) -> os.stat_result | None:
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(rel, "it is a symbolic link or not a regular file on this machine")
    return st


def check(base: Path, rel: str, areas: Sequence[str] = (AREA,)) -> list[str]:
    """Validate a path and what exists of it locally, writing nothing."""
    parts = safe_parts(rel, areas)
    with folder(base, parts, create=False) as fd:
        if fd is not None:
            _check_dest(fd, parts[-1], rel)
    return parts


def local_sha256(base: Path, parts: list[str]) -> tuple[int, str] | None:
    """Size and sha256 of the existing destination, or None when it is missing."""
    rel = "/".join(parts)
    with folder(base, parts, create=False) as fd:
        if fd is None or _check_dest(fd, parts[-1], rel) is None:
            return None
        return _hash_at(fd, parts[-1])


def _hash_at(fd: int, name: str) -> tuple[int, str]:
    with os.fdopen(os.open(name, _READ_FLAGS, dir_fd=fd), "rb") as fh:
        return sha256_fileobj(fh)


class Part:
    """The resumable temporary file ``<name>.part`` beside one destination."""

    def __init__(self, fd: int, parts: list[str]):
        self.fd, self.name, self.rel = fd, parts[-1], "/".join(parts)
        self.tmp = self.name + ".part"

    def size(self) -> int:
        st = _check_dest(self.fd, self.tmp, self.rel + ".part")
        return st.st_size if st else 0

    def open_append(self):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        return os.fdopen(os.open(self.tmp, flags, 0o666, dir_fd=self.fd), "ab")

    def sha256(self) -> str:
        return _hash_at(self.fd, self.tmp)[1]

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp, dir_fd=self.fd)

    def commit(self) -> None:
        """Rename into place; the destination must be a regular file or absent."""
        _check_dest(self.fd, self.name, self.rel)
        os.replace(self.tmp, self.name, src_dir_fd=self.fd, dst_dir_fd=self.fd)


__all__ = ["AREA", "UnsafePath", "safe_parts", "check", "folder", "local_sha256", "Part"]
