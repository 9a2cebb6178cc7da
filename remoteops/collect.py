"""``collect``: bring a run's directory and adapters back, resumable and hash-verified."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from remoteops.bundles import sha256_file
from remoteops.errors import ConnectError, RemoteOpsError
from remoteops.targets import Target

CHUNK = 1 << 20


@dataclass
class Collected:
    run_id: str
    fetched: list[str] = field(default_factory=list)
    unchanged: int = 0
    bytes: int = 0
    seconds: float = 0.0
    in_place: bool = False

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "fetched": self.fetched, "unchanged": self.unchanged,
                "bytes": self.bytes, "seconds": round(self.seconds, 2), "in_place": self.in_place}


def in_place(target: Target, project_dir: Path) -> bool:
    """The local target working in the project folder itself: nothing to copy."""
    return target.kind == "local" and Path(os.path.expanduser(target.project_root)).resolve() \
        == project_dir.resolve()


def fetch_file(target: Target, remote: str, local: Path, size: int, sha256: str,
               progress: Callable[[int], None] | None = None) -> int:
    """Download to ``local.part`` (resuming what is there), verify, rename; bytes received."""
    import paramiko

    part = local.with_name(local.name + ".part")
    local.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    got = 0
    try:
        with target.open_read(remote, have) as src, open(part, "ab") as dst:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                dst.write(chunk)
                got += len(chunk)
                if progress:
                    progress(len(chunk))
    except (socket.error, EOFError, paramiko.SSHException) as exc:
        raise ConnectError(f"the connection to {target.name} broke while collecting {remote} "
                           f"({exc}); run 'invoke collect' again: it resumes.") from None
    if sha256_file(part) != sha256:
        part.unlink()
        raise RemoteOpsError(f"{local} arrived damaged (sha256 mismatch); run 'invoke collect' "
                             "again.")
    os.replace(part, local)
    return got


def collect_run(target: Target, project_dir: Path, run_id: str | None = None,
                since: float | None = None, with_checkpoints: bool = False,
                progress_factory=None) -> Collected:
    """Fetch what differs (by sha256) from the server's run directory and adapters."""
    started = time.monotonic()
    args = ["pipeline-files", "--root", target.project_root]
    args += ["--run", run_id] if run_id else []
    args += ["--with-checkpoints"] if with_checkpoints else []
    listing = target.run_agent(*args)
    result = Collected(listing["run_id"])
    if in_place(target, project_dir):
        result.in_place = True
        result.unchanged = len(listing["files"])
        return result
    root = target.project_root.rstrip("/")
    todo = []
    for item in listing["files"]:
        if since is not None and item["mtime"] < since:
            continue
        local = project_dir / item["path"]
        if local.is_file() and local.stat().st_size == item["size"] and \
                sha256_file(local) == item["sha256"]:
            result.unchanged += 1
            continue
        todo.append(item)
    total = sum(i["size"] for i in todo)
    with (progress_factory(total) if progress_factory else _null()) as advance:
        for item in todo:
            result.bytes += fetch_file(target, f"{root}/{item['path']}", project_dir /
                                       item["path"], item["size"], item["sha256"], advance)
            result.fetched.append(item["path"])
    result.seconds = time.monotonic() - started
    return result


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
