"""The one check every path written under a project root goes through.

Bundle manifest entries, tar members, link targets, backup metadata and the
journal all name paths that end up joined to the project root on the server.
They come from files a hostile or damaged source may have written, so each
is normalised here and refused unless it stays inside the root, outside the
reserved ``.remoteops/`` folder, with every name within the file system's
limit. A lexical check is enough because the apply never follows links it
did not create: link targets are checked too (see ``safe_link_target``).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path

from remoteops.common.errors import RemoteOpsError

RESERVED = ".remoteops"
NAME_MAX = 255  # bytes per file name on Linux file systems (ext4, xfs, btrfs, tmpfs)


class UnsafePath(RemoteOpsError):
    """A path that would leave the project root, enter ``.remoteops/`` or cannot exist."""


BUNDLE_ADVICE = "rebuild the bundle from a clean tree"


def _refuse(name: object, where: str, why: str, advice: str = BUNDLE_ADVICE) -> UnsafePath:
    return UnsafePath(f"{where} holds an unsafe path {name!r} ({why}); refusing it, nothing "
                      f"was changed: {advice}.")


def _too_long(parts: list[str]) -> bool | None:
    """Whether a name is over NAME_MAX bytes (None: not encodable as a file name)."""
    try:
        return any(len(os.fsencode(p)) > NAME_MAX for p in parts)
    except UnicodeError:
        return None


def safe_relpath(name: object, where: str = "the bundle", advice: str = BUNDLE_ADVICE) -> str:
    """``name`` normalised (``a//./b`` -> ``a/b``), or UnsafePath if it may leave the root.

    Refused: non-strings, empty paths, absolute paths, ``..``, backslashes, NUL,
    names over NAME_MAX bytes, and anything under ``.remoteops/``.
    """
    def refuse(why: str) -> UnsafePath:
        return _refuse(name, where, why, advice)

    if not isinstance(name, str) or not name:
        raise refuse("empty or not text")
    if "\x00" in name or "\\" in name:
        raise refuse("NUL or backslash")
    if name.startswith("/"):
        raise refuse("absolute")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        raise refuse("names the root itself")
    if ".." in parts:
        raise refuse("'..'")
    if parts[0] == RESERVED:
        raise refuse(f"{RESERVED}/ is reserved for remoteops' own state")
    too_long = _too_long(parts)
    if too_long is None:
        raise refuse("not a valid file name")
    if too_long:
        raise refuse(f"a file name longer than {NAME_MAX} bytes")
    return "/".join(parts)


def canonical(name: object, where: str, advice: str = BUNDLE_ADVICE) -> str:
    """``safe_relpath`` for paths remoteops wrote itself: they must already be canonical."""
    rel = safe_relpath(name, where, advice)
    if rel != name:
        raise _refuse(name, where, "not in canonical form", advice)
    return rel


def safe_link_target(rel: str, target: object, where: str = "the bundle",
                     advice: str = BUNDLE_ADVICE) -> str:
    """The normalised target of a link at ``rel`` that stays inside the root, or UnsafePath.

    Only relative targets whose ``..`` all come first: with parents that are real
    folders (the apply makes them so) the link then resolves lexically, so a chain
    of such links can never climb out of the root.
    """
    def refuse(why: str) -> UnsafePath:
        return _refuse(target, where, f"link {rel} {why}", advice)

    if not isinstance(target, str) or not target or "\x00" in target or "\\" in target:
        raise refuse("has an empty or invalid target")
    if target.startswith("/"):
        raise refuse("points to an absolute path")
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    if ".." in parts[ups:]:
        raise refuse("has '..' after a name")
    depth = rel.count("/")
    if ups > depth:
        raise refuse("points outside the project")
    resolved = rel.split("/")[:depth - ups] + parts[ups:]
    if resolved and resolved[0] == RESERVED:
        raise refuse(f"points into {RESERVED}/")
    if _too_long(parts) is not False:
        raise refuse(f"has a name that is invalid or longer than {NAME_MAX} bytes")
    return "/".join(parts) or "."


def check_tree(entries: list[tuple[str, str | None]], where: str,
               advice: str = BUNDLE_ADVICE) -> None:
    """Entries ``(path, link target or None)`` form a tree: canonical, unique, no path
    under a file or a link (which would make the apply write through it)."""
    seen: set[str] = set()
    for rel, link in entries:
        canonical(rel, where, advice)
        if rel in seen:
            raise _refuse(rel, where, "listed twice", advice)
        seen.add(rel)
        if link is not None:
            safe_link_target(rel, link, where, advice)
    for rel in seen:
        parent = posixpath.dirname(rel)
        while parent:
            if parent in seen:
                raise _refuse(rel, where, f"{parent} is a file or link, not a folder", advice)
            parent = posixpath.dirname(parent)


def link_digest(target: str) -> str:
    """What stands for a link's content in manifests and backups (never a file's sha256
    by accident: a file would have to hold exactly these bytes)."""
    return hashlib.sha256(b"symlink\0" + os.fsencode(target)).hexdigest()


def link_entry(root: Path, path: Path) -> str:
    """The normalised target of the link ``path`` in the project ``root``, refused in one
    line when it is absolute or leaves the project (bundles keep links, never copies)."""
    rel = path.relative_to(root).as_posix()
    target = os.readlink(path)
    try:
        return safe_link_target(rel, target, "the project",
                                f"bundles keep only relative links inside the project; "
                                f"exclude {rel} (bundle.exclude) or replace it by a copy")
    except UnsafePath as exc:
        raise UnsafePath(str(exc).replace("the project holds an unsafe path",
                                          f"{rel} is a link to")) from None


def link_of(entry) -> str | None:
    """The link target of a manifest entry, or None for a regular file."""
    return getattr(entry, "link", None)


def ancestors(path: Path, top: Path) -> set[Path]:
    """Every folder above ``path`` up to ``top``, ``top`` itself included (none when
    ``path`` is not below ``top``). Compared by parts: ``top in path.parents`` cost a
    2,000-file apply ~0.06 s."""
    depth = len(path.parts) - len(top.parts)
    if depth <= 0 or path.parts[:len(top.parts)] != top.parts:
        return set()
    out = set()
    for _ in range(depth):
        path = path.parent
        out.add(path)
    return out
