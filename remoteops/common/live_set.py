"""What a trainer reads of a live dataset (``common/live_data``): wait for ``min_samples``,
then take the samples that arrived since, each once, and carry that in a checkpoint.

Pure Python, no torch: the built-in trainer and any command stage use the same rules.

- ``wait_ready`` polls the manifest until it lists ``min_samples`` samples or the producer
  marked the set complete (``sync-data --done``), reporting ``waiting for data N/M`` on each
  change, so a stage that waits is visibly waiting, not hung.
- ``take_new`` returns the listed samples not yet consumed, in arrival order, and counts them
  consumed. The manifest only grows and each id is listed once, so "consumed" is a prefix
  of it in practice; it is kept as ids anyway, to stay right if that ever changes.
- ``state`` is what a checkpoint saves: the consumed ids and a digest of ``id:sha256`` in
  order. ``LiveSet.resume(state)`` takes them back and refuses when a consumed sample is no
  longer listed, or is listed with other bytes, since a resume would then silently train
  on a different set.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

from remoteops.common import live_data
from remoteops.common.errors import RemoteOpsError


def waiting_line(have: int, need: int) -> str:
    """What ``status`` and the live view show while a stage waits."""
    return f"waiting for data {have}/{need}"


def _digest(pairs: list[tuple[str, str]]) -> str:
    return hashlib.sha256("".join(f"{i}:{s}\n" for i, s in pairs).encode()).hexdigest()


class LiveSet:
    """One stage's view of a live dataset folder."""

    def __init__(self, dest: str | Path, min_samples: int = 1, poll_seconds: float = 60.0):
        if int(min_samples) < 1:
            raise RemoteOpsError(f"min_samples is {min_samples}; it must be 1 or more.")
        self.dest = Path(dest)
        self.min_samples = int(min_samples)
        self.poll_seconds = float(poll_seconds)
        self._consumed: dict[str, str] = {}   # id -> sha256, in the order taken

    # -- reading ----------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        return live_data.read_manifest(self.dest)

    def complete(self) -> bool:
        return live_data.read_complete(self.dest) is not None

    def wait_ready(self, on_wait: Callable[[str], None] | None = None,
                   stop: Callable[[], bool] | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> int:
        """Block until ``min_samples`` are listed or the set is complete; return the count.

        ``stop()`` returning true ends the wait early (a cancelled run): RemoteOpsError."""
        shown = None
        while True:
            count = len(self.entries())
            if count >= self.min_samples:
                return count
            if self.complete():
                if count == 0:
                    raise RemoteOpsError(f"{self.dest} was marked complete with no samples; "
                                         "sync some with sync-data first.")
                return count  # the producer is done: train on what there is
            line = waiting_line(count, self.min_samples)
            if on_wait is not None and line != shown:
                on_wait(line)
                shown = line
            if stop is not None and stop():
                raise RemoteOpsError(f"stopped while {line} in {self.dest}.")
            sleep(self.poll_seconds)

    def take_new(self) -> list[dict]:
        """The listed samples not consumed yet, in arrival order; they count as consumed now."""
        new = [e for e in self.entries() if e["id"] not in self._consumed]
        for entry in new:
            self._consumed[entry["id"]] = entry["sha256"]
        return new

    def path_of(self, entry: dict) -> Path:
        """Where a listed sample is (its folder, file or one-line .jsonl)."""
        return self.dest / entry["path"]

    @property
    def consumed(self) -> list[str]:
        return list(self._consumed)

    # -- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict:
        pairs = list(self._consumed.items())
        return {"dest": str(self.dest), "consumed": [i for i, _ in pairs],
                "digest": _digest(pairs)}

    def state_of(self, pairs: list[tuple[str, str]]) -> dict:
        """``state()`` as it was when exactly ``pairs`` (``(id, sha256)``, in order) had been
        taken: what a checkpoint saves when the trainer has read ahead of what it trained."""
        pairs = [(str(i), str(s)) for i, s in pairs]
        return {"dest": str(self.dest), "consumed": [i for i, _ in pairs],
                "digest": _digest(pairs)}

    def resume(self, state: dict) -> None:
        """Take back a checkpoint's consumed samples; refuse if any changed or vanished."""
        listed = {e["id"]: e["sha256"] for e in self.entries()}
        ids = list(state.get("consumed") or [])
        missing = [i for i in ids if i not in listed]
        if missing:
            raise RemoteOpsError(f"the checkpoint consumed {len(missing)} sample(s) that "
                                 f"{self.dest} no longer lists ({', '.join(missing[:3])}); "
                                 "restore them, or start the stage afresh.")
        pairs = [(i, listed[i]) for i in ids]
        if _digest(pairs) != state.get("digest"):
            raise RemoteOpsError(f"samples the checkpoint consumed changed in {self.dest} since "
                                 "(their sha256 differs); restore them, or start the stage "
                                 "afresh.")
        self._consumed = dict(pairs)


def live_env(root: str | Path, table: dict) -> dict[str, str]:
    """What a command stage on a live dataset finds in its environment: the folder
    (``REMOTEOPS_LIVE_DATA``; its manifest is ``$REMOTEOPS_LIVE_DATA/.manifest.jsonl``, the
    producer's end marker ``.complete``) and the stage's ``min_samples`` and
    ``poll_seconds``. ``LiveSet.from_env()`` reads them back."""
    return {"REMOTEOPS_LIVE_DATA": str(Path(root) / table["dataset_live"]),
            "REMOTEOPS_LIVE_MIN_SAMPLES": str(int(table.get("min_samples", 1))),
            "REMOTEOPS_LIVE_POLL_SECONDS": str(float(table.get("poll_seconds", 60.0)))}


def from_env(environ: dict | None = None) -> LiveSet:
    """The stage's live set, as ``live_env`` described it (a command stage's own code)."""
    import os

    env = os.environ if environ is None else environ
    if not env.get("REMOTEOPS_LIVE_DATA"):
        raise RemoteOpsError("REMOTEOPS_LIVE_DATA is not set; run this as a stage with "
                             "dataset_live = \"data/live\" in its [stages.NAME] table.")
    return LiveSet(env["REMOTEOPS_LIVE_DATA"], int(env.get("REMOTEOPS_LIVE_MIN_SAMPLES", 1)),
                   float(env.get("REMOTEOPS_LIVE_POLL_SECONDS", 60.0)))


__all__ = ["LiveSet", "waiting_line", "live_env", "from_env"]
