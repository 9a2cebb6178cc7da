"""The order a live stage trains its samples in (pure Python, no torch).

A live dataset grows while the stage trains (``common/live_set``). The schedule turns it
into one stream of records, in *rounds*:

- A round is one pass, in a shuffled order (seed + round number), over every sample that
  has joined and still owes visits. Each sample is trained ``visits`` times in all
  (``train.epochs``, rounded, at least 1), one visit per round, so the first samples are
  not trained over and over while the set grows, and every sample of the final set ends
  with the same number of epochs.
- New samples join at each round boundary (the epoch boundary), or, with
  ``grow_every`` records, also in the middle of a round (appended, shuffled, to the rest of
  the round).
- With nothing left to train and the set still open, the schedule waits for more
  (``LiveSet.wait`` lines go to ``on_wait``). It ends when the producer marked the set
  complete (``sync-data --done``) and every sample has had its visits.

Resume: every join is an *event* ``{"pos", "kind", "ids": [[id, sha256], ...]}`` (the
stream position it took effect at). Given the events before a checkpoint's trained
position, the schedule replays every decision before it (an event, or "nothing joined":
no waiting, no reading of the manifest) and so rebuilds the exact order up to there; from
then on it reads the live set again. Samples that joined
after the trained position (a prefetch ran ahead of the checkpoint) are offered again, so
a resume neither repeats nor skips a record.
"""

from __future__ import annotations

import random
import time
from collections import deque
from typing import Any, Callable

from remoteops.common.live_set import LiveSet, waiting_line

Loader = Callable[[dict], list[Any]]  # a manifest entry -> its encoded records


class LiveSchedule:
    """One stage's stream over a live set; ``next()`` gives ``(id, record index, record)``."""

    def __init__(self, live: LiveSet, load: Loader, visits: int = 1, seed: int = 42,
                 grow_every: int = 0, on_wait: Callable[[str], None] | None = None,
                 on_join: Callable[[int, list[str]], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, replay: list[dict] | None = None,
                 replay_until: int = 0):
        self.live = live
        self.load = load
        self.visits = max(1, int(visits))
        self.seed = int(seed)
        self.grow_every = max(0, int(grow_every))
        self.on_wait = on_wait
        self.on_join = on_join
        self.sleep = sleep
        self.records: dict[str, list[Any]] = {}
        self.sha: dict[str, str] = {}
        self.joined: list[str] = []
        self.owed: dict[str, int] = {}
        self.round = 0
        self.round_starts: list[tuple[int, int]] = []  # (pos, round size in records)
        self.queue: deque = deque()
        self.history: list[tuple[str, int]] = []       # position -> (id, record index)
        self.events: list[dict] = []
        self.finished = False
        self._replay = {(e["pos"], e.get("kind", "round")): e for e in (replay or [])}
        self._entries: dict[str, dict] = {}
        # every decision before ``replay_until`` is replayed: an event, or "nothing joined"
        self._replay_end = replay_until - 1

    # -- the stream ------------------------------------------------------------------------
    @property
    def pos(self) -> int:
        return len(self.history)

    def next(self) -> tuple[str, int, Any] | None:
        """The next record, or None once the set is complete and every visit is done."""
        if self.finished:
            return None
        if self.grow_every and self.pos and self.pos % self.grow_every == 0 and self.queue:
            added = self._join("step")
            for sid in added:  # this round's visit is scheduled now
                self.owed[sid] -= 1
            self.queue.extend(self._order(added, self.round * 7919 + self.pos))
        while not self.queue:
            if not self._boundary():
                self.finished = True
                return None
        sid, index = self.queue.popleft()
        self.history.append((sid, index))
        return sid, index, self.records[sid][index]

    def _boundary(self) -> bool:
        """Start the next round (joining new samples first); False when all is done."""
        shown = None
        while True:
            replaying = self.pos <= self._replay_end
            complete = False if replaying else self.live.complete()  # before reading the list
            self._join("round")
            due = [s for s in self.joined if self.owed[s] > 0]
            if due:
                self.round += 1
                for sid in due:
                    self.owed[sid] -= 1
                order = self._order(due, self.round)
                self.round_starts.append((self.pos, len(order)))
                self.queue.extend(order)
                return True
            if complete:
                return False
            if replaying:  # the checkpoint's events end here: read the live set from now on
                self._replay.clear()
                self._replay_end = -1
                continue
            line = (f"waiting for more data ({len(self.joined)} samples so far; the set stays "
                    "open until sync-data --done)") if self.joined else \
                waiting_line(len(self.live.entries()), self.live.min_samples)
            if self.on_wait is not None and line != shown:
                self.on_wait(line)
                shown = line
            self.sleep(self.live.poll_seconds)

    def _entry(self, sid: str) -> dict:
        if sid not in self._entries:
            self._entries = {e["id"]: e for e in self.live.entries()}
        return self._entries[sid]

    def _order(self, ids: list[str], salt: int) -> list[tuple[str, int]]:
        ids = list(ids)
        random.Random(self.seed * 1_000_003 + salt).shuffle(ids)
        return [(sid, i) for sid in ids for i in range(len(self.records[sid]))]

    def _join(self, kind: str) -> list[str]:
        """Samples that join at this position: replayed from the events, else the live set's
        new ones. Returns their ids (joined, owing ``visits``)."""
        event = self._replay.pop((self.pos, kind), None)
        if event is not None:
            pairs = [tuple(p) for p in event["ids"]]
        elif self.pos <= self._replay_end:
            pairs = []
        else:
            new = self.live.take_new()
            pairs = [(e["id"], e["sha256"]) for e in new]
            for entry in new:
                self.records[entry["id"]] = self.load(entry)
        if not pairs:
            return []
        for sid, sha in pairs:
            if sid not in self.records:  # replayed: read it again (the digest was checked)
                self.records[sid] = self.load(self._entry(sid))
            self.sha[sid] = sha
            self.joined.append(sid)
            self.owed[sid] = self.visits
        ids = [sid for sid, _ in pairs]
        merged = self.events[-1] if self.events and self.events[-1]["pos"] == self.pos and \
            self.events[-1]["kind"] == kind else None
        if merged is not None:
            merged["ids"] += [list(p) for p in pairs]
        else:
            self.events.append({"pos": self.pos, "kind": kind, "ids": [list(p) for p in pairs]})
        if self.on_join is not None:
            self.on_join(self.pos, ids)
        return ids

    # -- what a checkpoint and the metrics read -------------------------------------------
    def state_at(self, trained: int) -> dict:
        """What a checkpoint saves when ``trained`` records have been trained: the events
        that took effect before it, and the live set's state of the samples they joined."""
        events = [e for e in self.events if e["pos"] < trained]
        pairs = [(sid, sha) for e in events for sid, sha in e["ids"]]
        return {"trained": trained, "events": events,
                "live": self.live.state_of(pairs), "visits": self.visits, "seed": self.seed,
                "grow_every": self.grow_every}

    def size_at(self, trained: int) -> int:
        """How many samples had joined the set the first ``trained`` records came from."""
        return sum(len(e["ids"]) for e in self.events if e["pos"] < max(trained, 1))

    def epoch_at(self, trained: int) -> float:
        """Rounds done at ``trained`` records, with the current one as a fraction."""
        done = 0.0
        for i, (start, size) in enumerate(self.round_starts):
            if trained >= start + size:
                done = i + 1.0
            elif trained > start:
                return i + (trained - start) / max(1, size)
        return done

    def rounds_started(self, trained: int) -> int:
        return sum(1 for start, _ in self.round_starts if start < max(trained, 1))


def restore(live: LiveSet, state: dict, load: Loader, **kwargs: Any) -> LiveSchedule:
    """A schedule that replays a checkpoint's ``state`` and then reads the live set."""
    live.resume(state["live"])
    schedule = LiveSchedule(live, load, visits=state.get("visits", 1),
                            seed=state.get("seed", 42), grow_every=state.get("grow_every", 0),
                            replay=state.get("events") or [],
                            replay_until=int(state.get("trained", 0)), **kwargs)
    for _ in range(int(state.get("trained", 0))):
        if schedule.next() is None:
            break
    return schedule


__all__ = ["LiveSchedule", "restore"]
