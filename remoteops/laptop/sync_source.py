"""The laptop's side of a live dataset: which local samples are complete, and the batch tar.

A source is a folder of per-sample folders (``dirs``), a folder of files (``files``) or a
growing JSONL file (``jsonl``, one sample per line). A sample is sent only once it is
*stable*:

- ``dirs`` / ``files``: its signature (every file's path, size and mtime) is the same at two
  looks at least ``settle_seconds`` apart. Names producers use while writing (hidden,
  ``*.tmp``, ``*.part``, ...) are never samples; writing to such a name and renaming it into
  place is the sure way, since a writer that pauses longer than ``settle_seconds`` between
  two chunks would otherwise look finished.
- ``jsonl``: only newline-terminated lines count; the id is the line number, so the file
  must only ever grow (a rewritten line is reported, never sent twice).

``write_batch`` packs samples into one deterministic tar.gz (``.batch.json`` first,
listing each id, path, sha256 and size), so the same samples give the same bytes and an
upload cut half way resumes into the same file.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from remoteops.common import live_data
from remoteops.common.errors import RemoteOpsError
from remoteops.common.files import atomic_output, sha256_file


@dataclass
class Sample:
    id: str
    path: Path | None = None         # dirs / files
    data: bytes | None = None        # jsonl: the line, newline included
    files: int = 1
    bytes: int = 0
    sha256: str = ""
    seen_at: float = 0.0             # monotonic time it was first seen complete
    mtime: float | None = None       # its newest file's mtime (dirs, files)

    def digest(self) -> str:
        if not self.sha256:
            if self.data is not None:
                import hashlib

                self.sha256 = hashlib.sha256(self.data).hexdigest()
            else:
                self.sha256 = live_data.sample_digest(self.path)
        return self.sha256


@dataclass
class Look:
    """One look at the source: stable samples in order, and what is still being written."""

    stable: list[Sample] = field(default_factory=list)
    pending: int = 0
    bad: list[str] = field(default_factory=list)   # lines or names that are not samples

    @property
    def total(self) -> int:
        return len(self.stable) + self.pending


class Source:
    """A local source, looked at again and again; remembers signatures between looks."""

    def __init__(self, path: Path, fmt: str, settle_seconds: float):
        if fmt not in live_data.FORMATS:
            raise RemoteOpsError(f"[sync] format is {fmt!r}; use dirs, files or jsonl.")
        self.path, self.fmt, self.settle = path, fmt, float(settle_seconds)
        self._sigs: dict[str, tuple[object, float]] = {}   # id -> (signature, since)

    def check(self) -> None:
        want_file = self.fmt == "jsonl"
        if not (self.path.is_file() if want_file else self.path.is_dir()):
            what = "a JSONL file" if want_file else "a folder"
            raise RemoteOpsError(f"the sync source {self.path} is not {what}; set [sync] source "
                                 "(or --source) to where the samples are written.")

    def look(self, assume_quiet: bool = False) -> Look:
        """Which samples are complete now (two looks at least ``settle_seconds`` apart;
        ``assume_quiet``: at a first look, one untouched for ``settle_seconds`` counts, as
        ``--status`` estimates)."""
        self.check()
        if self.fmt == "jsonl":
            return self._look_jsonl()  # a complete line is a complete sample
        now, out = time.monotonic(), Look()
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            if live_data.is_temp_name(entry.name):
                out.pending += live_data.in_progress(entry.name)  # a sample on its way
                continue
            if not live_data.valid_id(entry.name):
                out.bad.append(entry.name)
                continue
            sample, sig = self._sample(entry)
            if sample is None:
                continue
            old = self._sigs.get(entry.name)
            sample.mtime = max(m for _, _, m in sig) / 1e9
            if assume_quiet and old is None and self._quiet(sig):
                out.stable.append(sample)
            elif old is None or old[0] != sig:
                self._sigs[entry.name] = (sig, now)
                out.pending += 1
            elif now - old[1] >= self.settle and self._quiet(sig):
                sample.seen_at = old[1]
                out.stable.append(sample)
            else:
                out.pending += 1
        return out

    def _quiet(self, sig) -> bool:
        """No file of the sample was modified in the last ``settle_seconds`` (wall clock)."""
        newest = max((m for _, _, m in sig), default=0)
        return time.time_ns() - newest >= self.settle * 1e9

    def _sample(self, entry: os.DirEntry):
        if self.fmt == "dirs":
            if not entry.is_dir(follow_symlinks=False):
                return None, None
            files = live_data.sample_files(Path(entry.path))
            if not files:
                return None, None  # an empty folder is a sample not yet begun
            sig = tuple((rel, st.st_size, st.st_mtime_ns)
                        for rel, full in files for st in (full.stat(),))
            return Sample(entry.name, Path(entry.path), files=len(files),
                          bytes=sum(s for _, s, _ in sig)), sig
        if not entry.is_file(follow_symlinks=False):
            return None, None
        st = entry.stat()
        return (Sample(entry.name, Path(entry.path), bytes=st.st_size),
                (("", st.st_size, st.st_mtime_ns),))

    def _look_jsonl(self) -> Look:
        out, now = Look(), time.monotonic()
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            out.pending = 1  # the last line is still being written
        for number, line in enumerate(data[:end].splitlines(keepends=True), 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except ValueError:
                out.bad.append(f"line {number}")
                continue
            sid = live_data.jsonl_id(number)
            since = self._sigs.setdefault(sid, (None, now))[1]
            out.stable.append(Sample(sid, data=line, bytes=len(line), seen_at=since))
        return out


def _info(name: str, size: int = 0, folder: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uid, info.gid = size, 0, 0, 0
    info.type = tarfile.DIRTYPE if folder else tarfile.REGTYPE
    info.mode = 0o755 if folder else 0o644
    return info


def write_batch(samples: list[Sample], out_dir: Path) -> tuple[Path, str]:
    """Pack ``samples`` into a tar named by its sha256; return ``(path, sha256)``."""
    index = {"samples": [{"id": s.id, "path": s.id, "sha256": s.digest(), "bytes": s.bytes,
                          "files": s.files} for s in samples]}
    tmp = out_dir / f"batch-{os.getpid()}.tar.gz"
    # gzip level 1: tar headers and padding are most of a batch of small samples; mtime 0
    # keeps the bytes the same for the same samples (a cut upload resumes into them)
    with atomic_output(tmp) as fh, gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=1,
                                                 mtime=0, filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        head = json.dumps(index, sort_keys=True).encode()
        tar.addfile(_info(".batch.json", len(head)), io.BytesIO(head))
        for s in samples:
            if s.data is not None:
                tar.addfile(_info(s.id, len(s.data)), io.BytesIO(s.data))
            elif s.path.is_dir():
                tar.addfile(_info(s.id, folder=True))
                for rel, full in live_data.sample_files(s.path):
                    with open(full, "rb") as src:
                        tar.addfile(_info(f"{s.id}/{rel}", os.fstat(src.fileno()).st_size), src)
            else:
                with open(s.path, "rb") as src:
                    tar.addfile(_info(s.id, os.fstat(src.fileno()).st_size), src)
    digest = sha256_file(tmp)
    final = out_dir / f"sync-{digest[:16]}.tar.gz"
    os.replace(tmp, final)
    return final, digest


__all__ = ["Sample", "Look", "Source", "write_batch"]
