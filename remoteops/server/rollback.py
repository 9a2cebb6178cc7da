"""Roll a project root back to the state before a backup's change.

The latest backup undoes what is deployed now; an older one is reached by
walking back through every later one (``remoteops.server.backupset.chain``), so
the tree becomes exactly what it was before that change. The rollback is itself
a change (``remoteops.server.journal.commit``) with its own backup, so it can be
rolled back in turn.
"""

from __future__ import annotations

import os
from pathlib import Path

from remoteops.common.errors import RemoteOpsError
from remoteops.common.runs import refuse_if_live
from remoteops.server.applyplan import Put
from remoteops.server.backupset import chain, compose, list_backups, prune
from remoteops.server.journal import check_copy, commit, recover
from remoteops.server.projectroot import ProjectRoot


def resolve_backup(project: ProjectRoot, name: str) -> Path:
    """The backup folder ``name`` (a folder name or a path) names under this root."""
    path = Path(os.path.expanduser(name))
    candidate = path if path.is_absolute() else project.backups / name
    if not (candidate / "backup.json").is_file():
        known = ", ".join(b["name"] for b in list_backups(project.backups)[-3:]) or "none yet"
        raise RemoteOpsError(f"no backup {name!r} under {project.backups}; 'invoke backups' "
                             f"lists them (latest: {known}).")
    if project.backups.resolve() not in candidate.resolve().parents:
        raise RemoteOpsError(f"{name} is not a backup of {project.root}; pick one from "
                             "'invoke backups'.")
    return candidate


def _walk(project: ProjectRoot, name: str) -> tuple[list[tuple[Path, dict]], dict]:
    """The backups a rollback to ``name`` undoes (oldest first) and what it restores."""
    backup = resolve_backup(project, name)
    pending = project.pending_recovery()
    current = project.current()
    current_id = current.content_id if current else None
    skip = None
    if pending is not None:  # a dry run: as the recovery the rollback runs first leaves it
        skip = pending[0].name
        current_id = (pending[1]["manifest_before"] or {}).get("content_id")
        if backup.name == skip:
            raise RemoteOpsError(f"{name} is the backup of an interrupted change, which "
                                 "the next command undoes; roll back to an earlier one.")
    picked = chain(project.backups, backup, current_id, skip)
    return picked, compose(picked)


def rollback_plan(project: ProjectRoot, name: str) -> dict:
    """What a rollback to ``name`` would restore and remove; nothing is changed."""
    picked, composed = _walk(project, name)
    meta = picked[0][1]
    return {"backup": picked[0][0].name,
            "restore": sorted(p for p, found in composed.items() if found is not None),
            "remove": sorted(p for p, found in composed.items() if found is None),
            "label": meta["label"], "through": [f.name for f, _ in picked[1:]],
            "to_version": (meta["manifest_before"] or {}).get("version")}


def rollback(project: ProjectRoot, name: str, holder: str, keep: int = 10) -> dict:
    """Restore exactly the state before ``name``'s change, verify it, prune to ``keep``."""
    with project.lock(holder) as lock:
        refuse_if_live(project.root, "rolling back")  # a live run reads these files
        recovered = recover(project)
        picked, composed = _walk(project, name)
        changes = _changes(composed)
        before = picked[0][1]["manifest_before"]
        version = (before or {}).get("version") or 0
        extra: dict = {"rolled_back": picked[0][0].name}
        if len(picked) > 1:
            extra["walked_back"] = [f.name for f, _ in picked[1:]]
        result = commit(project, changes, kind="rollback", version=version, after=before,
                        label=f"rollback-to-v{version}", extra=extra)
        verified = _verify(project, composed)
        pruned = prune(project.backups, keep)
        return {**result, "verified": verified, "recovered": recovered, "pruned": pruned,
                "broken_lock": lock.broken, **extra}


def _changes(composed: dict) -> dict[str, Put | None]:
    """The change that restores ``composed``, each backup copy checked first."""
    changes: dict[str, Put | None] = {}
    for rel, found in composed.items():
        if found is None:
            changes[rel] = None
            continue
        folder, record = found
        source = folder / "files" / rel
        check_copy(source, record, "Nothing was changed.")
        changes[rel] = Put(source, record["mode"], record.get("link"))
    return changes


def _verify(project: ProjectRoot, composed: dict) -> int:
    """Every path is as the backups recorded (or gone); how many were checked."""
    expect = {p: found[1]["sha256"] for p, found in composed.items() if found is not None}
    gone = [p for p, found in composed.items() if found is None]
    actual = project.hashes(sorted(expect) + gone)
    wrong = [p for p, h in expect.items() if actual.get(p) != h]
    wrong += [p for p in gone if p in actual]
    if wrong:
        raise RemoteOpsError(f"after the rollback {wrong[0]} is not as the backup recorded; "
                             "check the disk and run the rollback again.")
    return len(composed)
