"""The laptop's copy of the base model arriving on the server (``model-receive``).

The laptop sends a manifest of its copy (path, size, sha256) to ``.remoteops/incoming/``.
``receive_plan`` says which files the server lacks or holds differently (by size, or by
sha256 unless the manifest is ``quick``). The laptop uploads those, resumably, to
``<incoming>/<sha256>`` (``laptop/transfer.put_resumable``); ``receive_commit`` hashes each
arrival, moves it into place (a rename on the same disk), and points the Hugging Face cache's
``refs/<revision>`` at the snapshot, so the model is found by its id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from remoteops.common import model_ref
from remoteops.common.errors import RemoteOpsError
from remoteops.common.files import fsync_dirs, fsync_path, sha256_file, write_atomic_text
from remoteops.common.paths import safe_relpath
from remoteops.server.model_fetch import resolve


def _read_manifest(path: str) -> dict:
    try:
        data = json.loads(Path(os.path.expanduser(path)).read_text(encoding="utf-8"))
        files = {safe_relpath(rel, "the model manifest", "upload from the laptop again"):
                 (int(v[0]), v[1]) for rel, v in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise RemoteOpsError(f"the model manifest {path} cannot be read ({exc}); run fetch-model "
                             "--from-laptop again.") from None
    snapshot = data.get("snapshot")
    if snapshot is not None and (not isinstance(snapshot, str) or
                                 not model_ref.REVISION.fullmatch(snapshot) or "/" in snapshot):
        raise RemoteOpsError(f"the model manifest {path} names a bad snapshot {snapshot!r}.")
    for rel, (size, sha) in files.items():
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
            raise RemoteOpsError(f"the model manifest {path} has a bad sha256 for {rel}.")
    return {**data, "files": files}


def _places(root: Path, manifest: dict) -> tuple[model_ref.ModelRef, str, str]:
    ref = resolve(manifest["ref"], root)
    dest = model_ref.upload_dest(ref, root, os.environ, manifest.get("snapshot"))
    # the upload area sits on the same disk as the model (a rename, never a copy)
    incoming = os.path.join(model_ref.hf_repo_dir(ref, os.environ) if ref.kind == "hf" else dest,
                            model_ref.INCOMING)
    return ref, dest, incoming


def receive_plan(root: Path, manifest_path: str) -> dict:
    """Which of the laptop's files the server lacks (or holds differently)."""
    manifest = _read_manifest(manifest_path)
    ref, dest, incoming = _places(root, manifest)
    have = model_ref.model_files(dest) if os.path.isdir(dest) else {}
    need = []
    for rel, (size, sha) in sorted(manifest["files"].items()):
        if have.get(rel) != size:
            need.append(rel)
        elif not manifest.get("quick") and sha and sha256_file(os.path.join(dest, rel)) != sha:
            need.append(rel)
    where = model_ref.nearest_existing(dest)
    extra = sorted(set(have) - set(manifest["files"]))
    return {"ref": ref.canonical(), "kind": ref.kind, "dest": dest, "incoming": incoming,
            "need": need, "need_bytes": sum(manifest["files"][r][0] for r in need),
            "have": len(manifest["files"]) - len(need), "extra": extra[:20],
            "free_bytes": shutil.disk_usage(where).free, "free_at": where}


def receive_commit(root: Path, manifest_path: str) -> dict:
    """Hash each uploaded file, move it into place; the model must then be complete."""
    manifest = _read_manifest(manifest_path)
    ref, dest, incoming = _places(root, manifest)
    placed, moved_bytes, folders = [], 0, {dest}
    arrived: dict[str, str] = {}  # sha256 -> where that content now is
    for rel in manifest.get("need") or []:
        rel = safe_relpath(rel, "the model manifest", "upload from the laptop again")
        if rel not in manifest["files"]:
            raise RemoteOpsError(f"{rel} is not in the model manifest; upload again.")
        size, sha = manifest["files"][rel]
        src = arrived.get(sha) or os.path.join(incoming, sha)
        if not os.path.isfile(src):
            raise RemoteOpsError(f"{rel} did not arrive on the server; run fetch-model "
                                 "--from-laptop again (it sends only what is missing).")
        if sha not in arrived and sha256_file(src) != sha:
            os.unlink(src)
            raise RemoteOpsError(f"{rel} arrived damaged (its sha256 differs) and was removed; run "
                                 "fetch-model --from-laptop again.")
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        folders.add(os.path.dirname(target))
        if sha in arrived:
            shutil.copyfile(src, target + ".tmp")
            fsync_path(target + ".tmp")
            os.replace(target + ".tmp", target)
        else:
            fsync_path(src)
            if os.path.islink(target):
                os.unlink(target)  # a cache link to a blob: the file takes its place
            os.replace(src, target)
            arrived[sha] = target
        placed.append(rel)
        moved_bytes += size
    fsync_dirs(sorted(folders))
    if ref.kind == "hf" and manifest.get("snapshot") and not re.fullmatch(
            r"[0-9a-f]{40}", ref.revision or ""):  # a branch or tag points at the snapshot
        refs = os.path.join(model_ref.hf_repo_dir(ref, os.environ), "refs", ref.revision or "main")
        os.makedirs(os.path.dirname(refs), exist_ok=True)
        write_atomic_text(refs, manifest["snapshot"])
    try:
        os.rmdir(incoming)  # only when empty: parts of other uploads stay
    except OSError:
        pass
    try:
        os.unlink(os.path.expanduser(manifest_path))
    except OSError:
        pass
    report = model_ref.inspect_folder(dest)
    return {"ref": ref.canonical(), "dest": dest, "placed": placed, "bytes": moved_bytes,
            "files": report["files"], "total_bytes": report["bytes"],
            "problems": report["problems"]}


__all__ = ["receive_plan", "receive_commit"]
