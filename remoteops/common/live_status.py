"""What a stage on a live dataset is doing now, for ``status`` and the live view (pure Python).

The trainer rewrites ``<run dir>/live_<stage>.json`` (atomically) whenever its state
changes: while it waits (``waiting for data 12/50``), when data joins, at each step. The
agent's ``pipeline-status`` puts it in the running stage's ``current`` entry; the runner's
health window does not run while the stage waits for data (``StageWatch``).

Fields: ``line`` (what to show), ``waiting`` (true while no record can be trained),
``samples`` (the set's size so far), ``trained`` (records trained), ``round``, ``complete``
(the producer said ``sync-data --done``), ``dest``, ``time`` (epoch seconds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from remoteops.common.files import write_atomic_text


def status_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / f"live_{stage}.json"


def write_status(run_dir: str | Path, stage: str, **fields: Any) -> None:
    fields["time"] = time.time()
    write_atomic_text(status_path(run_dir, stage), json.dumps(fields, default=str) + "\n")


def read_status(run_dir: str | Path, stage: str) -> dict | None:
    """The stage's live-data status, or None (not a live stage, or not started yet)."""
    try:
        data = json.loads(status_path(run_dir, stage).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_waiting(run_dir: str | Path, stage: str) -> bool:
    return bool((read_status(run_dir, stage) or {}).get("waiting"))


__all__ = ["status_path", "write_status", "read_status", "is_waiting"]
