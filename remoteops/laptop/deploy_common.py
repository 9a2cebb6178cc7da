"""What every deploy step shares: the outcome, the server's state folder, the upload file
(bundle or delta) and the one ``deploy-apply`` request."""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from remoteops.common.config import Settings
from remoteops.common.files import link_or_copy
from remoteops.common.target import Target
from remoteops.common.manifest import Manifest
from remoteops.laptop.build import Built
from remoteops.laptop.delta import write_delta

Confirm = Callable[[dict], bool]
# Upload the bundle itself rather than a delta when the plan needs this share of its bytes.
WHOLE_BUNDLE_SHARE = 0.9


@dataclass
class DeployOutcome:
    bundle: Built
    target: str
    root: str
    plan: dict
    applied: dict | None = None
    sent_bytes: int = 0
    upload_bytes: int = 0
    agent_installed: bool = False
    dry_run: bool = False
    seconds: float = 0.0
    events: list[str] = field(default_factory=list)
    events_shown: int = 0  # how many the plan's printout showed (later ones show at the end)
    # the local tar still to write, when the caller asked to do it after closing the target
    finish_local: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def noop(self) -> bool:
        return not (self.plan["need"] or self.plan["delete"])

    def to_dict(self) -> dict:
        return {"bundle": str(self.bundle.tar_path), "version": self.bundle.manifest.version,
                "content_id": self.bundle.manifest.content_id, "target": self.target,
                "root": self.root, "plan": {k: self.plan[k] for k in
                                            ("added", "changed", "delete", "unchanged")},
                "applied": self.applied, "sent_bytes": self.sent_bytes,
                "agent_installed": self.agent_installed, "dry_run": self.dry_run,
                "noop": self.noop, "seconds": round(self.seconds, 3), "events": self.events}


def state_dir(target: Target) -> str:
    return f"{target.project_root.rstrip('/')}/.remoteops"


def holder(action: str) -> str:
    return f"{action} by {getpass.getuser()}@{socket.gethostname()}"


def bundles_dir(settings: Settings) -> Path:
    out = Path(settings["bundle.out_dir"])
    return out if out.is_absolute() else settings.project_dir / out


def upload_file(settings: Settings, built: Built, need: list[str], out_dir: Path,
                 key: str) -> Path:
    """The file to upload: the bundle itself when nearly all of it is needed, else a delta."""
    manifest = built.manifest
    path = out_dir / f"{manifest.project}-{key}.tar.zst"
    sizes = manifest.file_map()
    needed = sum(sizes[p].size for p in need)
    if needed >= WHOLE_BUNDLE_SHARE * max(1, manifest.total_size):
        if not path.is_file():
            link_or_copy(built.tar_path, path)
        return path
    return write_delta(built.tar_path, need, path, int(settings["bundle.compression_level"]),
                       manifest=manifest, source_dir=settings.project_dir)


def delta_key(manifest: Manifest, need: list[str]) -> str:
    """The delta's name for this manifest and these files (same files, same name)."""
    return hashlib.sha256(json.dumps([manifest.content_id, need]).encode()).hexdigest()[:16]


def apply_args(settings: Settings, target: Target, manifest: Manifest, remote_manifest: str,
               delta: tuple[str, str] | None = None, expect_base: str | None = None) -> list[str]:
    """The one ``deploy-apply`` request: ``delta`` is ``(remote path, sha256)``; with
    ``expect_base`` the server applies only onto that base (the fast path)."""
    args = ["deploy-apply", "--root", target.project_root, "--manifest", remote_manifest,
            "--holder", holder(f"deploy v{manifest.version}"),
            "--keep", str(int(settings["deploy.keep_backups"]))]
    if expect_base is not None:
        args += ["--expect-base", expect_base, "--expect-agent", manifest.toolkit_version]
    if delta is not None:
        args += ["--delta", delta[0], "--sha256", delta[1]]
    return args
