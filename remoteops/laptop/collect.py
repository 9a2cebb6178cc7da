"""``collect``: bring a run's directory and stage outputs back, resumable and hash-verified.

The server's listing is not trusted: every path is validated and confined to
``outputs/`` before anything is written (``safe_write``). A file that changes
while it is fetched (a live run's log) is retried briefly, then skipped and
reported, so the rest still arrives. ``--since`` is measured by the server's
clock, which the listing carries.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from remoteops.laptop import safe_write
from remoteops.common.files import CHUNK
from remoteops.common.errors import ConnectError, RemoteOpsError
from remoteops.common.target import Target

RETRIES = 2  # fresh listings for files that changed while being fetched
RETRY_DELAY = 0.5
STILL_WRITING = "still being written on the server"
GONE = "removed on the server while collecting"


@dataclass
class Since:
    """``--since``: a duration back from the server's now, or a time on the laptop's clock."""

    seconds: float | None = None
    at: float | None = None  # epoch seconds by the laptop's clock

    def cutoff(self, server_now: float, offset: float) -> float:
        """The oldest server mtime to collect; ``offset`` is server clock minus laptop clock."""
        if self.seconds is not None:
            return server_now - self.seconds
        return float(self.at) + offset


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str | float | None) -> Since | None:
    """``10`` (minutes), ``90s``/``10m``/``2h``/``1d``, or a time like ``2026-11-26T14:00``."""
    if text is None or text == "":
        return None
    raw = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", raw, re.I)
    if m:
        return Since(seconds=float(m.group(1)) * _UNITS[(m.group(2) or "m").lower()])
    try:
        when = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise RemoteOpsError(f"--since {raw!r} is not understood; give minutes (10), a duration "
                             "(90s, 10m, 2h, 1d) or a time (2026-11-26T14:00).") from None
    return Since(at=when.timestamp())  # a naive time is the laptop's local time


@dataclass
class Collected:
    run_id: str
    fetched: list[str] = field(default_factory=list)
    unchanged: int = 0
    bytes: int = 0
    seconds: float = 0.0
    in_place: bool = False
    skipped: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)  # paths the server would not list

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "fetched": self.fetched, "unchanged": self.unchanged,
                "bytes": self.bytes, "seconds": round(self.seconds, 2), "in_place": self.in_place,
                "skipped": self.skipped, "refused": self.refused}

    def merge(self, later: "Collected") -> None:
        """Fold a later collect of the same run into this one."""
        self.fetched += [p for p in later.fetched if p not in self.fetched]
        self.bytes += later.bytes
        self.skipped = [s for s in self.skipped if s["path"] not in later.fetched] + [
            s for s in later.skipped if s["path"] not in {x["path"] for x in self.skipped}]


def in_place(target: Target, project_dir: Path) -> bool:
    """The local target working in the project folder itself: nothing to copy."""
    return target.kind == "local" and Path(os.path.expanduser(target.project_root)).resolve() \
        == project_dir.resolve()


def fetch_file(target: Target, remote: str, base: Path, parts: list[str], size: int,
               sha256: str, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Download the listed ``size`` bytes to ``<name>.part`` (resuming), verify, rename.

    Returns ``(outcome, bytes received)``: ``ok``; ``growing`` (more bytes follow the
    listed ones: still being written); ``changed`` (the bytes differ from the listing);
    ``gone`` (removed on the server)."""
    import paramiko

    with safe_write.folder(base, parts, create=True) as fd:
        if fd is None:
            return "gone", 0  # a local folder vanished while we created it: try again later
        part = safe_write.Part(fd, parts)
        have = part.size()
        if have > size:
            part.discard()
            have = 0
        got = 0
        try:
            src = target.open_read(remote, have)
        except FileNotFoundError:
            return "gone", 0
        except (socket.error, EOFError, paramiko.SSHException) as exc:
            raise _broken(target, remote, exc) from None
        try:
            with src, part.open_append() as dst:
                while got < size - have:
                    chunk = _read(target, remote, src, min(CHUNK, size - have - got))
                    if not chunk:
                        break
                    dst.write(chunk)
                    got += len(chunk)
                    if progress:
                        progress(len(chunk))
                more = _read(target, remote, src, 1)
        except OSError as exc:  # this machine's side: the server's errors are _read's
            raise RemoteOpsError(f"could not write {part.rel} here ({exc.strerror or exc}); "
                                 "free some space or fix the folder's permissions, then run "
                                 "'invoke collect' again: it resumes.") from None
        if have + got < size:
            part.discard()  # shorter than listed: rewritten since
            return "changed", got
        if part.sha256() != sha256:
            part.discard()
            return "changed", got
        if more:
            return "growing", got  # the part is a verified prefix: a retry resumes after it
        part.commit()
    return "ok", got


def _broken(target: Target, remote: str, exc: BaseException) -> ConnectError:
    return ConnectError(f"the connection to {target.name} broke while collecting {remote} "
                        f"({exc}); run 'invoke collect' again: it resumes.")


def _read(target: Target, remote: str, src, n: int) -> bytes:
    """Read from the server; only the server's side becomes a connection error (a full local
    disk stays an OSError of its own)."""
    import paramiko

    try:
        return src.read(n)
    except (socket.error, EOFError, paramiko.SSHException) as exc:
        raise _broken(target, remote, exc) from None


def listing_args(target: Target, run_id: str | None, with_checkpoints: bool = False) -> list[str]:
    """The ``pipeline-files`` request: the run's files with their sizes and sha256, and its
    status (``state``)."""
    args = ["pipeline-files", "--root", target.project_root]
    args += ["--run", run_id] if run_id else []
    return args + (["--with-checkpoints"] if with_checkpoints else [])


def fetch_listing(target: Target, args: list[str]) -> tuple[dict, float]:
    """The server's answer to ``args`` (a listing) and its clock's offset from ours (server
    minus laptop)."""
    before = time.time()
    listing = target.run_agent(*args)
    after = time.time()
    if not isinstance(listing, dict) or not isinstance(listing.get("files"), list):
        raise RemoteOpsError(f"the server's file list for collect is malformed; check the "
                             f"agent on {target.name}.")
    now = listing.get("now")
    offset = float(now) - (before + after) / 2 if isinstance(now, (int, float)) else 0.0
    return listing, offset


def write_areas(settings) -> list[str]:
    """Where collect may write: ``outputs/`` and the outputs that the command stages of the
    laptop's own config declare (the server's word does not widen this)."""
    from remoteops.common.runs import stage_kind, stage_outputs

    areas = [safe_write.AREA]
    for name, table in (settings["stages"] or {}).items():
        if isinstance(table, dict) and stage_kind(name, table) == "command":
            areas += [p for p in stage_outputs(name, table)
                      if p not in (".", "") and p.split("/")[0] not in (".remoteops", ".git")]
    return areas


def _validated(listing: dict, project_dir: Path, areas: list[str] | None,
               into: list[str] | None = None) -> list[tuple[dict, list[str]]]:
    """Every listed file with its checked local path; refuses the whole listing on one bad
    entry, before anything is written. ``into`` (``["outputs", host]``): the local path is
    moved under that folder (``outputs/x`` -> ``outputs/<host>/x``; a stage output
    ``results/y`` -> ``outputs/<host>/results/y``), so several hosts never collide."""
    out = []
    for item in listing["files"]:
        path = item.get("path") if isinstance(item, dict) else item
        parts = safe_write.check(project_dir, path, areas or [safe_write.AREA])
        if into:
            parts = into + (parts[1:] if parts[0] == safe_write.AREA else parts)
        size = item.get("size") if isinstance(item, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(
                item.get("sha256"), str) or not isinstance(item.get("mtime"), (int, float)):
            raise RemoteOpsError(f"the server's entry for {path!r} is malformed; nothing was "
                                 "collected. Check the server's agent.")
        out.append((item, parts))
    return out


def collect_run(target: Target, project_dir: Path, run_id: str | None = None,
                since: Since | float | None = None, with_checkpoints: bool = False,
                progress_factory=None, areas: list[str] | None = None,
                listed: tuple[dict, float] | None = None,
                into: list[str] | None = None) -> Collected:
    """Fetch what differs (by sha256) from the server's run directory and stage outputs.

    ``listed``: a listing already fetched (``fetch_listing``), else one is asked for. The
    server is listed again only for files that changed while they were being fetched.
    """
    started = time.monotonic()
    listing, offset = listed or fetch_listing(target, listing_args(target, run_id,
                                                                   with_checkpoints))
    result = Collected(listing.get("run_id") or run_id or "?",
                       refused=list(listing.get("refused") or []))
    if in_place(target, project_dir):
        result.in_place = True
        result.unchanged = len(listing["files"])
        return result
    entries = _validated(listing, project_dir, areas, into)
    if isinstance(since, (int, float)):
        since = Since(at=float(since))  # an epoch on the laptop's clock (older callers)
    cutoff = since.cutoff(float(listing.get("now") or time.time()), offset) if since else None
    todo = []
    for item, parts in entries:
        if cutoff is not None and item["mtime"] < cutoff:
            continue
        if safe_write.local_sha256(project_dir, parts) == (item["size"], item["sha256"]):
            result.unchanged += 1
            continue
        todo.append((item, parts))
    root = target.project_root.rstrip("/")
    total = sum(i["size"] for i, _ in todo)
    with (progress_factory(total) if progress_factory else _null()) as advance:
        for attempt in range(RETRIES + 1):
            again = []
            for item, parts in todo:
                outcome, got = fetch_file(target, f"{root}/{item['path']}", project_dir, parts,
                                          item["size"], item["sha256"], advance)
                result.bytes += got
                if outcome == "ok":
                    result.fetched.append(item["path"])
                elif outcome == "gone":
                    result.skipped.append({"path": item["path"], "reason": GONE})
                else:
                    again.append(item["path"])
            if not again:
                break
            if attempt == RETRIES:
                result.skipped += [{"path": p, "reason": STILL_WRITING} for p in again]
                break
            time.sleep(RETRY_DELAY * (attempt + 1))
            fresh, _ = fetch_listing(target, listing_args(target, result.run_id,
                                                          with_checkpoints))
            todo = [(i, p) for i, p in _validated(fresh, project_dir, areas, into)
                    if i["path"] in again]
            listed = {i["path"] for i, _ in todo}
            result.skipped += [{"path": p, "reason": GONE} for p in again if p not in listed]
    result.seconds = time.monotonic() - started
    return result


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


__all__ = ["Collected", "Since", "parse_since", "collect_run", "fetch_file", "fetch_listing",
           "listing_args", "in_place", "write_areas",
           "STILL_WRITING"]
