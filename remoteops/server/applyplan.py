"""How a change meets the disk: its order, atomic and durable placing, links.

A change is a set of paths, each removed (None) or given content (``Put``).
Where a path changes type between versions (a file becomes a folder or the
reverse) every removal must happen before anything is placed, deepest first,
so that the folders they empty are gone before a file takes their name.
Whatever the journal relies on is fsynced first, files and the folders that
name them, as dpkg does: after a power cut recovery finds what it recorded.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from remoteops.common.clock import utc_stamp
from remoteops.common.files import CHUNK, temp_name

LINK_MODE = 0o777  # what lstat reports for a link on Linux, and what a link entry records


@dataclass(frozen=True)
class Put:
    """Content for a path: a copy of ``source`` with ``mode``, or a link to ``link``."""

    source: Path | None
    mode: int
    link: str | None = None
    # ``source`` is a verified staging copy with its mode set (``incoming.extract``): it is
    # renamed into place
    move: bool = False


def copy_synced(source: Path, dest: Path, mode: int | None = None) -> None:
    """Copy a file (or re-create a link) at ``dest`` and fsync it before returning."""
    if source.is_symlink():
        os.symlink(os.readlink(source), dest)
        return
    with open(source, "rb") as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)
        dst.flush()
        os.fsync(dst.fileno())
    shutil.copystat(source, dest)
    if mode is not None:
        os.chmod(dest, mode)


def place(put: Put, dest: Path, made: set[Path] | None = None) -> None:
    """Put content at ``dest`` atomically (temp name + rename), durable once its folder is
    fsynced. ``dest`` must not be a folder (see ``clear_dirs``). ``made``: folders this
    change made already (each is made once)."""
    if made is None or dest.parent not in made:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if made is not None:
            made.add(dest.parent)
    if put.move and put.link is None:
        try:
            os.replace(put.source, dest)
            return
        except OSError:
            pass  # another file system: copy below
    tmp = dest.with_name(temp_name(dest.name))
    tmp.unlink(missing_ok=True)
    if put.link is not None:
        os.symlink(put.link, tmp)
    else:
        copy_synced(put.source, tmp, put.mode)
    os.replace(tmp, dest)


def remove(dest: Path) -> None:
    """Remove a file or link at ``dest``; a folder there is left to ``clear_dirs``."""
    try:
        if dest.is_symlink() or not dest.is_dir():
            dest.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass  # gone already, or a parent is a file now (removed in its turn)


def prune_dirs(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to ``root`` while they are empty."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _is_real_dir(path: Path) -> bool:
    """A folder, not a link to one (one lstat)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def clear_dirs(dest: Path) -> bool:
    """Remove a folder at ``dest`` holding only empty folders; False if it holds more."""
    if not _is_real_dir(dest):
        return True
    for folder, dirs, files in os.walk(dest, topdown=False):
        if files or any(os.path.islink(os.path.join(folder, d)) for d in dirs):
            return False
        os.rmdir(folder)
    return True


def fresh_folders(root: Path, puts: list[str],
                  changes: dict) -> dict[str, tuple[Path, list[str]]]:
    """Folders to move into place whole: top-most folders the change needs that are not
    under ``root`` yet, whose files are all staged moves at the same relative place in one
    staging folder that holds nothing else. ``{folder: (its staged copy, [files it places])}``.
    (A first deploy renames a few folders instead of every file: 2,000 renames and their
    Python were ~50 ms after the last byte.)
    """
    base = _staging_base(changes)
    if base is None:
        return {}
    present: dict[str, bool] = {"": True}

    def is_dir(folder: str) -> bool:
        if folder not in present:
            present[folder] = _is_real_dir(root / folder)
        return present[folder]

    groups: dict[str, list[str]] = {}
    for rel in puts:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if not is_dir(folder):
                groups.setdefault(folder, []).append(rel)
                break
    out = {}
    for folder, rels in groups.items():
        moved = [r for r in rels if changes[r].move and changes[r].link is None]
        staged = os.path.join(base, folder)
        if moved and _holds_exactly(staged, len(moved)):
            out[folder] = (Path(staged), moved)
    return out


def _staging_base(changes: dict) -> str | None:
    """The one folder every staged move comes from, at its own relative path (else None)."""
    base = None
    for rel, put in changes.items():
        if put is None or not put.move or put.link is not None:
            continue
        source = str(put.source)
        if not source.endswith("/" + rel):
            return None
        here = source[:-len(rel) - 1]
        if base is not None and here != base:
            return None
        base = here
    return base


def _holds_exactly(folder: str, files: int) -> bool:
    """``folder`` (a real folder) holds ``files`` regular files and nothing else but
    folders, at any depth."""
    if not _is_real_dir(Path(folder)):
        return False
    count, todo = 0, [folder]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    count += 1
                else:
                    return False
    return count == files


def order(changes: dict) -> tuple[list[str], list[str]]:
    """Removals deepest first, then what is placed, parents before children."""
    removals = sorted((p for p, c in changes.items() if c is None),
                      key=lambda p: (-p.count("/"), p))
    puts = sorted((p for p, c in changes.items() if c is not None),
                  key=lambda p: (p.count("/"), p))
    return removals, puts


def conflict(root: Path, changes: dict) -> str | None:
    """Why placing ``changes`` would meet something they do not remove (None: it will not).

    Checked before anything changes: a folder where a file goes must hold only
    files this change removes; a parent folder must not be a file it keeps. Each
    folder is looked at once, and nothing is looked for in a folder that is not there
    (a first deploy: one lstat per folder, not per file).
    """
    removed = {p for p, c in changes.items() if c is None}
    top = str(root)
    kinds: dict[str, str] = {"": "dir"}

    def kind(folder: str) -> str:
        """``dir`` (a folder, or a link to one), ``missing``, or ``other``."""
        if folder not in kinds:
            path = os.path.join(top, folder)
            try:
                os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                kinds[folder] = "missing"
            else:
                kinds[folder] = "dir" if os.path.isdir(path) else "other"
        return kinds[folder]

    for rel, change in changes.items():
        if change is None:
            continue
        parent = os.path.dirname(rel)
        folder = parent
        while folder:
            if kind(folder) == "other" and folder not in removed:
                return (f"{folder} is a file on the server where the change needs a folder; "
                        "move it away and run it again")
            folder = os.path.dirname(folder)
        if kind(parent) == "missing":
            continue  # nothing can be at rel
        dest = root / rel
        if _is_real_dir(dest):
            for folder, dirs, files in os.walk(dest):
                for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
                    inner = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                    if inner not in removed:
                        return (f"{rel} is a folder on the server holding {inner}, which the "
                                f"change does not manage; move it away and run it again")
    return None


def displace(root: Path, rel: str, into: Path) -> Path:
    """Move whatever is at ``rel`` out of the way into ``into`` (recovery never gets stuck)."""
    target = into / utc_stamp() / rel
    n = 1
    while target.exists() or target.is_symlink():
        n += 1
        target = target.with_name(f"{target.name[:200]}.{n}")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(root / rel, target)
    return target


def entry_of(path: Path) -> tuple[str, int, str | None] | None:
    """``(kind, mode, link target)`` of what is at ``path``: kind ``file``/``link``, or None."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        return "link", LINK_MODE, os.readlink(path)
    if stat.S_ISREG(st.st_mode):
        return "file", st.st_mode & 0o7777, None
    return None
