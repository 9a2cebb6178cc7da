"""A live dataset's folder on the server, and its manifest: the one format the sync writes
and the trainer (or a command stage) reads.

Layout of ``<project root>/<dest>`` (``dest`` is ``[sync] dest``, e.g. ``data/live``)::

    data/live/
      .manifest.jsonl     one line per verified sample, appended in order (below)
      .complete           written by ``sync-data --done``: the producer is finished
      .incoming/          the agent's scratch space (temp names; never read)
      .lock               flock held while a batch is committed
      sample_0000/...     a sample of a ``dirs`` source: its folder
      a.txt               a sample of a ``files`` source: the file
      line-000001.jsonl   a sample of a ``jsonl`` source: that one line, newline included

A sample's id is its name in the folder (``path`` == ``id`` today; readers use ``path``).

Each manifest line is a JSON object::

    {"id": "sample_0000", "path": "sample_0000", "sha256": "<hex>", "bytes": 123,
     "files": 2, "at": "2026-11-26T16:20:01Z"}

``path`` is relative to the dest folder; ``sha256`` is ``sample_digest`` of it (a file's
own sha256; for a folder, the sha256 of its sorted ``<relpath>\\0<sha256>\\n`` lines).

The rules a reader relies on:

- A sample is there when, and only when, its line is in the manifest. Its bytes were
  written to a temp name, fsynced, renamed into place and the folder fsynced *before*
  the line was appended, and the digest was checked against the laptop's.
- Lines are appended in one ``write`` of whole lines under the lock, then fsynced. A line
  without its newline (a crash mid-write) is not a sample; the next commit cuts it off.
- An id appears once. Readers still keep the first line of an id and ignore the rest.
- Line order is arrival order, so "the first N lines" is a stable prefix to train on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

from remoteops.common.files import sha256_file

MANIFEST = ".manifest.jsonl"
COMPLETE = ".complete"
INCOMING = ".incoming"
LOCK = ".lock"
FORMATS = ("dirs", "files", "jsonl")

# a sample's id is also its name in the dest folder: one plain name, never hidden
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}")
# what a producer writes before renaming into place; never a sample
_IN_PROGRESS = re.compile(r"\.(tmp|part|partial|crdownload)$")
_TEMP = re.compile(r"^\.|\.(tmp|part|partial|swp|crdownload)$|~$")


def valid_id(name: str) -> bool:
    """Whether ``name`` may be a sample id (a plain, visible file or folder name)."""
    return bool(_ID.fullmatch(name)) and name not in (".", "..")


def is_temp_name(name: str) -> bool:
    """A name producers use while writing (hidden, ``.tmp``, ``.part``...): never sent."""
    return bool(_TEMP.search(name))


def in_progress(name: str) -> bool:
    """A name a sample has while it is written (``*.tmp``, ``*.part``...), before its rename."""
    return bool(_IN_PROGRESS.search(name))


def jsonl_id(line_number: int) -> str:
    """The id of the 1-based ``line_number`` of a JSONL source."""
    return f"line-{line_number:06d}.jsonl"


def sample_files(path: Path) -> list[tuple[str, Path]]:
    """A sample folder's regular files as sorted ``(relpath, path)`` (temp names skipped)."""
    out = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not is_temp_name(d))
        for name in files:
            if not is_temp_name(name):
                full = Path(folder) / name
                out.append((full.relative_to(path).as_posix(), full))
    return sorted(out)


def tree_digest(entries: list[tuple[str, str]]) -> str:
    """The digest of a folder from its ``(relpath, sha256)`` pairs."""
    text = "".join(f"{rel}\0{sha}\n" for rel, sha in sorted(entries))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sample_digest(path: str | os.PathLike) -> str:
    """A sample's sha256: the file's own, or ``tree_digest`` of a folder."""
    path = Path(path)
    if path.is_dir():
        return tree_digest([(rel, sha256_file(full)) for rel, full in sample_files(path)])
    return sha256_file(path)


def read_manifest(dest: str | os.PathLike) -> list[dict]:
    """The verified samples in ``dest``, in arrival order (first line of each id wins; a
    torn or unreadable line is skipped)."""
    try:
        data = (Path(dest) / MANIFEST).read_bytes()
    except FileNotFoundError:
        return []
    out, seen = [], set()
    for entry in _entries(data):
        if entry["id"] not in seen:
            seen.add(entry["id"])
            out.append(entry)
    return out


def _entries(data: bytes) -> Iterator[dict]:
    end = data.rfind(b"\n")
    for raw in data[:end + 1].splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and \
                isinstance(entry.get("sha256"), str) and isinstance(entry.get("path"), str):
            yield entry


def read_complete(dest: str | os.PathLike) -> dict | None:
    """The ``.complete`` marker (``{"samples": N, "at": ...}``), or None while data may come."""
    try:
        return json.loads((Path(dest) / COMPLETE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


__all__ = ["MANIFEST", "COMPLETE", "INCOMING", "LOCK", "FORMATS", "valid_id", "is_temp_name",
           "in_progress",
           "jsonl_id", "sample_files", "tree_digest", "sample_digest", "read_manifest",
           "read_complete"]
