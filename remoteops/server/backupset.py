"""The backups of a project root: their order, their metadata, and walking back.

Backups are ordered by a sequence number kept on the server (in each
``backup.json`` and in ``.remoteops/backup-seq``), never by their names: a
name carries a UTC stamp for people to read, and a clock stepped back or two
changes in one second would sort them wrongly. Paths read from metadata are
checked like tar members (``remoteops.common.paths``) before anything uses them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from remoteops.common.errors import RemoteOpsError
from remoteops.common.paths import UnsafePath, canonical, safe_link_target

SEQ_FILE = "backup-seq"


def read_backup(folder: Path) -> dict:
    """A backup's metadata with every path in it checked; RemoteOpsError when unusable."""
    try:
        meta = json.loads((folder / "backup.json").read_text(encoding="utf-8"))
        records = meta["overwritten"] + meta["deleted"]
        created = list(meta["created"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RemoteOpsError(f"backup {folder.name} is damaged ({exc}); pick another one from "
                             "'invoke backups'.") from None
    advice = "the backup was altered: delete it or pick another one from 'invoke backups'"
    where = f"backup {folder.name}"
    try:
        for record in records:
            rel = canonical(record.get("path") if isinstance(record, dict) else None, where,
                            advice)
            if record.get("link") is not None:
                safe_link_target(rel, record["link"], where, advice)
        for rel in created:
            canonical(rel, where, advice)
    except UnsafePath as exc:
        raise RemoteOpsError(str(exc)) from None
    return meta


def _seq(meta: dict) -> int:
    seq = meta.get("seq")
    return seq if isinstance(seq, int) else 0  # backups written before seq existed


SUMMARY = "summary.json"  # what listing needs, next to the (large) backup.json


def summarize(meta: dict) -> dict:
    """A backup's listing fields (``backup.json`` holds two whole manifests: 2 x 300 KB for a
    2,000-file project, read for every backup by every deploy before there were summaries)."""
    files = meta["overwritten"] + meta["deleted"]
    return {"seq": meta.get("seq"), "kind": meta["kind"], "version": meta["version"],
            "created_at": meta["created_at"], "files": len(files) + len(meta["created"]),
            "size": sum(r["size"] for r in files),
            "from_version": (meta["manifest_before"] or {}).get("version")}


def _summary(folder: Path) -> dict | None:
    if not (folder / "backup.json").is_file():
        return None  # not complete
    try:
        return json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass  # a backup made before summaries
    try:
        return summarize(json.loads((folder / "backup.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def catalogue(backups: Path) -> list[tuple[Path, dict]]:
    """Every complete backup with its (unchecked) summary, oldest first by sequence."""
    if not backups.is_dir():
        return []
    out = []
    for folder in backups.iterdir():
        summary = _summary(folder)
        if isinstance(summary, dict):
            out.append((folder, summary))
    return sorted(out, key=lambda fm: (_seq(fm[1]), fm[0].name))


def list_backups(backups: Path) -> list[dict]:
    """Backups oldest first by sequence number; the last undoes what is deployed now."""
    out = []
    for folder, summary in catalogue(backups):
        try:
            out.append({"name": folder.name, "path": str(folder), "kind": summary["kind"],
                        "version": summary["version"], "seq": summary.get("seq"),
                        "created_at": summary["created_at"], "files": summary["files"],
                        "size": summary["size"], "from_version": summary.get("from_version"),
                        "current": False})
        except (KeyError, TypeError, AttributeError):
            continue  # damaged metadata: not offered
    if out:
        out[-1]["current"] = True
    return out


def prune(backups: Path, keep: int) -> list[str]:
    """Remove all but the ``keep`` latest backups; their names."""
    rows = list_backups(backups)
    doomed = rows[:-keep] if keep > 0 else []
    for b in doomed:
        shutil.rmtree(b["path"], ignore_errors=True)
    return [b["name"] for b in doomed]


def next_seq(state: Path, backups: Path) -> int:
    """One more than any sequence number used so far in this root."""
    try:
        last = int((state / SEQ_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        last = 0
    return max([last] + [_seq(meta) for _, meta in catalogue(backups)]) + 1


def _content_id(manifest: dict | None) -> str | None:
    return (manifest or {}).get("content_id")


def chain(backups: Path, backup: Path, current_id: str | None,
          skip: str | None = None) -> list[tuple[Path, dict]]:
    """``backup`` and every later one (but ``skip``), oldest first, each checked.

    Rolling back to ``backup`` undoes all of them; refused unless each later change
    started from the state the one before left, up to what is deployed now.
    """
    rows = [(folder, meta) for folder, meta in catalogue(backups) if folder.name != skip]
    names = [folder.name for folder, _ in rows]
    start = names.index(backup.name)
    picked = [(folder, read_backup(folder)) for folder, _ in rows[start:]]
    latest = picked[-1][0].name
    for (_, older), (folder, newer) in zip(picked, picked[1:]):
        if _content_id(newer["manifest_before"]) != _content_id(older["manifest_after"]):
            raise RemoteOpsError(
                f"backup {backup.name} is not the latest and {folder.name} did not start from "
                f"the state it left, so it cannot be walked back to exactly; roll back to "
                f"{latest} first, then to the ones before it. Nothing was changed.")
    if _content_id(picked[-1][1]["manifest_after"]) != current_id:
        raise RemoteOpsError(
            f"what is deployed now is not what backup {latest} (the latest) recorded after its "
            "change; deploy again before rolling back. Nothing was changed.")
    return picked


def compose(picked: list[tuple[Path, dict]]) -> dict[str, tuple[Path, dict] | None]:
    """Path -> ``(backup folder, record)`` to restore, or None to remove: the state before
    the oldest change of ``picked``. The oldest backup that touched a path knows it."""
    out: dict[str, tuple[Path, dict] | None] = {}
    for folder, meta in picked:
        for record in meta["overwritten"] + meta["deleted"]:
            out.setdefault(record["path"], (folder, record))
        for rel in meta["created"]:
            out.setdefault(rel, None)
    return out
