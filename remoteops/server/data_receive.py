"""Samples arriving from the laptop's ``sync-data`` (agent commands ``data-status``,
``data-receive``, ``data-done``); the folder and manifest format are in
``common/live_data``.

A batch is one tar (gzip or plain) uploaded by SFTP (``laptop/transfer.put_resumable``) to
``.remoteops/incoming/``, its first member ``.batch.json`` listing each sample's id, path,
sha256 and size. ``receive_batch`` checks the tar's sha256, refuses any member that is not
a regular file or folder under a listed sample, unpacks into ``<dest>/.incoming/``, fsyncs,
checks each sample's digest, renames it into place, fsyncs the folder, and only then
appends the batch's manifest lines (one write, fsync). All of it under ``<dest>/.lock``, so
two sync processes never interleave a commit.

Exactly once: a sample whose id is already in the manifest is skipped, not placed again.
A commit killed between the rename and the append leaves the sample in place but unlisted
(invisible to readers); the next delivery finds the same digest there and only appends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tarfile
import time
import uuid
from pathlib import Path

from remoteops.common import live_data
from remoteops.common.clock import now_iso
from remoteops.common.errors import RemoteOpsError
from remoteops.common.files import fsync_dirs, fsync_path, sha256_file, write_atomic_json
from remoteops.common.paths import UnsafePath, safe_relpath

ADVICE = "run sync-data again (it resends the batch)"


def dest_dir(root: str, dest: str) -> Path:
    """The live dataset's folder: ``dest`` under the project root, checked."""
    rel = safe_relpath(dest, "[sync] dest", "set it to a folder inside the project, e.g. "
                       "data/live")
    return Path(os.path.expanduser(root)).resolve() / rel


@contextlib.contextmanager
def _locked(dest: Path):
    dest.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest / live_data.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def status(root: str, dest: str, ids: bool = True) -> dict:
    """What the server holds: count, last arrival, the completion marker, and each id's
    sha256 (the laptop resumes from it)."""
    folder = dest_dir(root, dest)
    entries = live_data.read_manifest(folder)
    out = {"dest": str(folder), "samples": len(entries),
           "last_at": entries[-1].get("at") if entries else None,
           "complete": live_data.read_complete(folder)}
    if ids:
        out["ids"] = {e["id"]: e["sha256"] for e in entries}
    return out


def _index(tar: tarfile.TarFile, tar_name: str) -> list[dict]:
    member = tar.next()
    if member is None or member.name != ".batch.json" or not member.isfile():
        raise RemoteOpsError(f"{tar_name} does not start with its .batch.json; {ADVICE}.")
    try:
        samples = json.loads(tar.extractfile(member).read())["samples"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteOpsError(f"{tar_name} has an unreadable .batch.json ({exc}); {ADVICE}.") \
            from None
    for s in samples:
        if not (isinstance(s, dict) and isinstance(s.get("id"), str) and live_data.valid_id(
                s["id"]) and s.get("path") == s["id"] and isinstance(s.get("sha256"), str)):
            raise RemoteOpsError(f"{tar_name} lists a bad sample {s!r}; {ADVICE}.")
    return samples


def _unpack(tar: tarfile.TarFile, tar_name: str, stage: Path, wanted: set[str],
            listed: set[str]) -> set[Path]:
    """Write the members of ``wanted`` samples under ``stage``, each fsynced; return folders."""
    folders = {stage}
    for member in tar:
        if member.name == ".batch.json":
            continue  # read by _index already (iterating starts over)
        try:
            name = safe_relpath(member.name, tar_name, ADVICE)
        except UnsafePath as exc:
            raise RemoteOpsError(str(exc)) from None
        top = name.split("/")[0]
        if top not in listed or not (member.isfile() or member.isdir()):
            raise RemoteOpsError(f"{tar_name} holds {name!r}, which is not a listed sample's "
                                 f"file or folder; refusing the batch; {ADVICE}.")
        if top not in wanted:
            continue
        out = stage / name
        if member.isdir():
            out.mkdir(parents=True, exist_ok=True)
            folders.add(out)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        folders.add(out.parent)
        with tar.extractfile(member) as src, open(out, "wb") as fh:
            shutil.copyfileobj(src, fh, 1 << 20)
            fh.flush()
            os.fsync(fh.fileno())
    return folders


def _append(dest: Path, lines: list[dict]) -> None:
    """Append manifest lines in one write, after cutting off a torn last line."""
    path = dest / live_data.MANIFEST
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            data = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
            if not data.endswith(b"\n"):
                keep = size - len(data) + data.rfind(b"\n") + 1 if b"\n" in data else 0
                os.ftruncate(fd, keep)
        os.write(fd, b"".join(json.dumps(line, sort_keys=True).encode() + b"\n"
                              for line in lines))
        os.fsync(fd)
    finally:
        os.close(fd)


def _place(staged: Path, final: Path, digest: str, trash: Path) -> None:
    """Rename ``staged`` to ``final``; what is there already stays if it is the same sample
    (a commit killed before its append), else it is moved aside first."""
    if final.exists() or final.is_symlink():
        if not final.is_symlink() and live_data.sample_digest(final) == digest:
            return
        trash.mkdir(exist_ok=True)
        os.replace(final, trash / uuid.uuid4().hex)
    os.replace(staged, final)


def receive_batch(root: str, dest: str, tar_path: str, sha256: str) -> dict:
    """Verify, unpack and commit one uploaded batch; return what was added and skipped."""
    folder = dest_dir(root, dest)
    tar_file = Path(os.path.expanduser(tar_path))
    if not tar_file.is_file():
        raise RemoteOpsError(f"the batch {tar_file.name} did not arrive; {ADVICE}.")
    if sha256_file(tar_file) != sha256:
        tar_file.unlink()
        raise RemoteOpsError(f"the batch {tar_file.name} arrived damaged (its sha256 differs) "
                             f"and was removed; {ADVICE}.")
    with _locked(folder):
        if live_data.read_complete(folder) is not None:
            raise RemoteOpsError(f"{dest} was marked complete (sync-data --done); remove "
                                 f"{folder / live_data.COMPLETE} on the server to add more.")
        have = {e["id"] for e in live_data.read_manifest(folder)}
        # under the lock no other commit runs: what is in .incoming was left by a killed one
        shutil.rmtree(folder / live_data.INCOMING, ignore_errors=True)
        stage = folder / live_data.INCOMING / f"b-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        stage.mkdir(parents=True)
        try:
            with tarfile.open(tar_file, "r:*") as tar:
                samples = _index(tar, tar_file.name)
                wanted = {s["id"] for s in samples} - have
                folders = _unpack(tar, tar_file.name, stage, wanted,
                                  {s["id"] for s in samples})
            fsync_dirs(folders)
            added, lines = [], []
            for s in samples:
                if s["id"] not in wanted:
                    continue
                staged = stage / s["path"]
                if not staged.exists():
                    raise RemoteOpsError(f"sample {s['id']} is listed in {tar_file.name} but "
                                         f"not in it; {ADVICE}.")
                digest = live_data.sample_digest(staged)
                if digest != s["sha256"]:
                    raise RemoteOpsError(f"sample {s['id']} arrived with another sha256 than "
                                         "the laptop's (changed while it was sent?); nothing "
                                         f"of this batch was kept; {ADVICE}.")
                _place(staged, folder / s["path"], digest, stage / ".replaced")
                added.append(s["id"])
                lines.append({"id": s["id"], "path": s["path"], "sha256": digest,
                              "bytes": int(s.get("bytes", 0)), "files": int(s.get("files", 1)),
                              "at": now_iso()})
                wanted.discard(s["id"])  # a repeated id in one batch goes in once
            if lines:
                fsync_path(folder)
                _append(folder, lines)
        except tarfile.TarError as exc:
            raise RemoteOpsError(f"the batch {tar_file.name} is not a readable tar ({exc}); "
                                 f"{ADVICE}.") from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        tar_file.unlink()
        _prune_parts(tar_file.parent)
        count = len(live_data.read_manifest(folder))
    return {"added": added, "skipped": sorted({s["id"] for s in samples} & have),
            "samples": count, "ids": {line["id"]: line["sha256"] for line in lines}}


def _prune_parts(incoming: Path, older_than: float = 3600.0) -> None:
    """Part files of batches never finished (the laptop packed other samples since)."""
    now = time.time()
    for part in incoming.glob("sync-*.part"):
        try:
            if now - part.stat().st_mtime > older_than:
                part.unlink()
        except OSError:
            pass


def mark_complete(root: str, dest: str, expect: int | None = None) -> dict:
    """Write ``.complete``: the producer is done (``expect``: the count it believes sent)."""
    folder = dest_dir(root, dest)
    with _locked(folder):
        count = len(live_data.read_manifest(folder))
        if expect is not None and count != expect:
            raise RemoteOpsError(f"the server holds {count} sample(s), the laptop expects "
                                 f"{expect}; run sync-data until they agree, then --done.")
        marker = {"samples": count, "at": now_iso()}
        write_atomic_json(folder / live_data.COMPLETE, marker)
    return {"dest": str(folder), **marker}


__all__ = ["dest_dir", "status", "receive_batch", "mark_complete"]
