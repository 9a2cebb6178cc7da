"""UTC times as the toolkit writes them.

Two ISO-8601 forms exist on purpose, each relied on by the files that hold it:
``now_iso`` (seconds, ``Z``: state.json, the lock, the ledger, manifests) and
``now_iso_precise`` (microseconds, ``+00:00``: the trainer's summary, signals
and heartbeat, post-processing records).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_stamp() -> str:
    """For names (run folders, backups): ``20261126T133042Z``."""
    return time.strftime(STAMP_FORMAT, time.gmtime())


def now_iso() -> str:
    """ISO-8601 UTC to the second: ``2026-11-26T13:30:42Z``."""
    return time.strftime(ISO_FORMAT, time.gmtime())


def now_iso_precise() -> str:
    """ISO-8601 UTC with microseconds (``datetime.isoformat``):
    ``2026-11-26T13:30:42.123456+00:00``."""
    return datetime.now(timezone.utc).isoformat()


__all__ = ["STAMP_FORMAT", "ISO_FORMAT", "utc_stamp", "now_iso", "now_iso_precise"]
