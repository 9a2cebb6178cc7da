"""One change to a project root, made so that it is all old or all new; and its undo.

``commit`` backs up every file or link the change overwrites or deletes (plus the
list of paths it creates) and only then writes the journal, each fsynced; it
removes paths deepest first, then places each file by temp file + rename, or a
new folder staged whole by one rename (``remoteops.server.applyplan``), fsyncs
the folders, records the new state and
the ledger entry and drops the journal. A change killed at any point leaves the
journal behind: ``recover`` (run first by every command) puts the backup back.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from remoteops.common.clock import now_iso, utc_stamp
from remoteops.common.errors import RemoteOpsError
from remoteops.common.files import fsync_dirs, sha256_file, temp_name
from remoteops.common.paths import ancestors, link_digest
from remoteops.server.applyplan import (Put, clear_dirs, conflict, copy_synced, displace,
                                        fresh_folders, order, place, prune_dirs, remove)
from remoteops.server.backupset import SEQ_FILE, SUMMARY, next_seq, summarize
from remoteops.server.projectroot import ProjectRoot, write_json


# -- the change ------------------------------------------------------------------------------
def commit(project: ProjectRoot, changes: dict[str, Put | None], kind: str, version: int,
           after: dict | None, label: str, extra: dict | None = None,
           known: dict[str, str] | None = None) -> dict:
    """Back up, journal, replace, record. ``changes``: path -> Put, or None to remove.

    ``known``: path -> sha256 of content this process verified (no need to hash again).
    """
    reason = conflict(project.root, changes)
    if reason:
        raise RemoteOpsError(f"{reason}. Nothing was changed.")
    seq = next_seq(project.state, project.backups)
    backup = _new_backup_folder(project, label)
    current = project.current()
    before = current.to_dict() if current else None
    overwritten, deleted, created = _back_up(project, changes, backup)
    meta = {"kind": kind, "label": label, "version": version, "seq": seq,
            "created_at": now_iso(), "overwritten": overwritten, "deleted": deleted,
            "created": created, "manifest_before": before, "manifest_after": after,
            **(extra or {})}
    write_json(project.state / SEQ_FILE, seq)
    write_json(backup / SUMMARY, summarize(meta))
    write_json(backup / "backup.json", meta)  # the backup is complete from here on
    write_json(project.state / "journal.json", {"backup": backup.name, "kind": kind,
                                                "started": now_iso(), "pid": os.getpid()})
    _replace(project, changes)
    project.record(after, sorted(changes), known)
    project.ledger({"action": kind, "version": version, "label": label, "backup": backup.name,
                    "overwritten": len(overwritten), "deleted": len(deleted),
                    "created": len(created), **(extra or {})})
    (project.state / "journal.json").unlink()
    fsync_dirs([project.state])
    return {"action": kind, "noop": False, "version": version, "backup": str(backup),
            "backup_name": backup.name, "overwritten": len(overwritten),
            "deleted": len(deleted), "created": len(created)}


def _new_backup_folder(project: ProjectRoot, label: str) -> Path:
    """``backups/<UTC stamp>-<label>``, with ``.2``, ``.3``... while the name is taken."""
    name = f"{utc_stamp()}-{label}"
    backup = project.backups / name
    n = 1
    while backup.exists():
        n += 1
        backup = project.backups / f"{name}.{n}"
    return backup


def _back_up(project: ProjectRoot, changes: dict[str, Put | None],
             backup: Path) -> tuple[list[dict], list[dict], list[str]]:
    """Copy every file or link the change overwrites or deletes into ``backup/files``,
    durably; the records of what was overwritten and deleted, and the paths created."""
    files_dir = backup / "files"
    scan = project.scan(sorted(changes))
    overwritten, deleted, created = [], [], []
    folders = {project.backups, backup}
    for rel in sorted(changes):
        path = project.root / rel
        if rel in scan.hashes:
            copy = files_dir / rel
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy_synced(path, copy)
            folders |= {copy.parent} | ancestors(copy.parent, backup)
            record = {"path": rel, "sha256": scan.hashes[rel], "size": os.lstat(path).st_size,
                      "mode": scan.modes[rel]}
            if rel in scan.links:
                record["link"] = os.readlink(path)
            (deleted if changes[rel] is None else overwritten).append(record)
        elif changes[rel] is not None:
            created.append(rel)
    fsync_dirs(folders)  # every copy is durable before backup.json says it exists
    return overwritten, deleted, created


def _replace(project: ProjectRoot, changes: dict[str, Put | None]) -> None:
    """Removals deepest first, then each file placed; the folders fsynced."""
    root = project.root
    removals, puts = order(changes)
    touched: set[Path] = {root}
    for rel in removals:
        path = root / rel
        remove(path)
        prune_dirs(path.parent, root)
        touched |= ancestors(path, root)
    made: set[Path] = set()
    placed: set[str] = set()
    for folder, (staged, files) in fresh_folders(root, puts, changes).items():
        path = root / folder  # a new folder, all of it staged: one rename (its files and
        try:  # folders are durable already)
            os.rename(staged, path)
        except OSError:
            continue  # e.g. staging on another file system: file by file below
        touched |= ancestors(path, root) | {path}
        placed.update(files)
        _fault_point(len(files))
    for rel in puts:
        if rel in placed:
            continue
        path = root / rel
        if not clear_dirs(path):
            raise RemoteOpsError(f"{path} is a folder that is not empty; move it away and "
                                 "run the command again (the change will be undone).")
        place(changes[rel], path, made)
        touched |= ancestors(path, root)
        _fault_point()
    fsync_dirs(touched)  # the new names are durable before the journal goes


_placed = 0  # files placed by this process, for _fault_point


def _fault_point(files: int = 1) -> None:
    """Fault injection for the test suite: a real SIGKILL after N files are placed (a
    folder moved whole places all of its files at once)."""
    global _placed
    limit = os.environ.get("REMOTEOPS_TEST_KILL_AFTER_FILES")
    if limit is not None:
        _placed += files
        if _placed >= int(limit):
            os.kill(os.getpid(), 9)


# -- its undo --------------------------------------------------------------------------------
def recover(project: ProjectRoot) -> dict | None:
    """Undo an interrupted change (all old again); drop half-written backups."""
    result = None
    pending = project.pending_recovery()
    if pending is not None:
        backup, meta = pending
        _drop_temp_files(project, meta)
        restored, displaced = _restore_from(project, backup, meta)
        project.record(meta["manifest_before"], restored)
        project.ledger({"action": "recover", "undone": meta["kind"], "label": meta["label"],
                        "backup": backup.name, "restored": len(restored),
                        "displaced": [str(p) for p in displaced]})
        (project.state / "journal.json").unlink()
        fsync_dirs([project.state])
        shutil.rmtree(backup, ignore_errors=True)  # it described a change that never was
        result = {"undone": meta["kind"], "label": meta["label"], "files": len(restored)}
        if displaced:
            result["displaced"] = [str(p) for p in displaced]
    if project.backups.is_dir():
        for folder in project.backups.iterdir():
            if folder.is_dir() and not (folder / "backup.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
    return result


def _drop_temp_files(project: ProjectRoot, meta: dict) -> None:
    """The temp files an interrupted ``place`` may have left beside each path."""
    for rel in [r["path"] for r in meta["overwritten"] + meta["deleted"]] + meta["created"]:
        dest = project.root / rel
        try:
            (dest.parent / temp_name(dest.name)).unlink(missing_ok=True)
        except (NotADirectoryError, IsADirectoryError):
            pass  # a file or folder where the parent was: undone below


def check_copy(source: Path, record: dict, consequence: str) -> None:
    """A backup copy is what its record says, or RemoteOpsError ending in ``consequence``."""
    try:
        actual = (link_digest(os.readlink(source)) if record.get("link") is not None
                  else sha256_file(source))
    except OSError:
        actual = None
    if actual != record["sha256"]:
        raise RemoteOpsError(f"backup file {source} does not match its recorded sha256; the "
                             f"backup is damaged. {consequence}")


def _restore_from(project: ProjectRoot, backup: Path,
                  meta: dict) -> tuple[list[str], list[Path]]:
    """Put back every file the backup holds; remove paths the change created.

    Never stuck: whatever else stands where a file goes (a folder that is not
    empty, a file where a folder goes) is moved to ``.remoteops/displaced/``.
    """
    root = project.root
    touched: list[str] = []
    displaced: list[Path] = []
    folders: set[Path] = {root}
    for rel in sorted(meta["created"], key=lambda p: (-p.count("/"), p)):
        path = root / rel
        remove(path)  # a folder there is the one the change was to replace: kept
        prune_dirs(path.parent, root)
        folders |= ancestors(path, root)
        touched.append(rel)
    records = sorted(meta["overwritten"] + meta["deleted"],
                     key=lambda r: (r["path"].count("/"), r["path"]))
    for record in records:
        rel = record["path"]
        source = backup / "files" / rel
        check_copy(source, record, "Restore that file by hand.")
        displaced += _clear_way(project, rel)
        dest = root / rel
        place(Put(source, record["mode"], record.get("link")), dest)
        folders |= ancestors(dest, root)
        touched.append(rel)
    fsync_dirs(folders)
    return touched, displaced


def _clear_way(project: ProjectRoot, rel: str) -> list[Path]:
    """Move aside a file where a parent folder of ``rel`` goes, and a folder that is not
    empty at ``rel``; where each went."""
    root, into = project.root, project.state / "displaced"
    moved: list[Path] = []
    parts = rel.split("/")
    for i in range(1, len(parts)):
        above = root.joinpath(*parts[:i])
        if (above.is_symlink() or above.exists()) and not above.is_dir():
            moved.append(displace(root, "/".join(parts[:i]), into))
    if not clear_dirs(root / rel):
        moved.append(displace(root, rel, into))
    return moved
