"""The laptop's record of what each target has deployed (``<bundles>/.deployed/<key>.json``).

The fast path plans against it; a plan or an answer from the server keeps it in
step, and anything that changes the server behind it (a rollback) forgets it.
Every write is best effort: a missing record only means the server plans.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from remoteops.common.config import Settings
from remoteops.common.files import write_atomic_json
from remoteops.common.target import Target
from remoteops.common.bundle_tar import BundleError
from remoteops.common.manifest import Manifest, content_id, load_manifest
from remoteops.laptop.build import Built, writer_lock
from remoteops.laptop.deploy_common import bundles_dir

# Where the laptop records what each target has deployed (under the bundles folder).
DEPLOYED_DIR = ".deployed"


def record_path(settings: Settings, target: Target) -> Path:
    key = hashlib.sha256(f"{target.kind}\0{target.name}\0{target.project_root}".encode())
    return bundles_dir(settings) / DEPLOYED_DIR / f"{key.hexdigest()[:32]}.json"


def recall(settings: Settings, target: Target) -> tuple[Manifest, int] | None:
    """The manifest recorded as deployed on ``target`` and the free bytes it last had."""
    try:
        data = json.loads(record_path(settings, target).read_text(encoding="utf-8"))
        with writer_lock(bundles_dir(settings)):  # the last deploy's bundle may be in writing
            manifest = load_manifest(Path(data["manifest"]))
        free = int(data.get("free_bytes") or 0)
    except (OSError, ValueError, KeyError, TypeError, BundleError):
        return None
    if manifest.content_id != data.get("content_id") or content_id(
            manifest.files, manifest.toolkit_wheel, manifest.plugins) != manifest.content_id:
        return None
    return manifest, free


def remember(settings: Settings, target: Target, manifest_path: Path, manifest: Manifest,
              free_bytes: int | None) -> None:
    """Record that ``manifest`` is what ``target`` has deployed now (best effort)."""
    path = record_path(settings, target)
    record = {"target": target.name, "root": target.project_root,
              "content_id": manifest.content_id, "version": manifest.version,
              "manifest": str(Path(manifest_path).resolve()), "free_bytes": free_bytes}
    try:
        write_atomic_json(path, record, indent=1)
    except OSError:
        pass


def forget(settings: Settings, target: Target) -> None:
    try:
        record_path(settings, target).unlink(missing_ok=True)
    except OSError:
        pass


def note_plan(settings: Settings, target: Target, built: Built,
               recalled: tuple[Manifest, int] | None, plan: dict) -> None:
    """Keep the record in step with what the server's plan says it has deployed."""
    current = plan.get("current_content_id")
    if current == built.manifest.content_id:
        remember(settings, target, built.manifest_path, built.manifest, plan.get("free_bytes"))
    elif recalled is None or recalled[0].content_id != current:
        forget(settings, target)
