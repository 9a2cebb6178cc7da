"""The live schedule without torch: rounds, visits, growth mid-round, and a replay from a
checkpoint's state that rebuilds exactly the order the first run trained in."""

from __future__ import annotations

import json
from collections import Counter

from remoteops.common.live_set import LiveSet
from remoteops.trainer.live_schedule import LiveSchedule, restore
from tests.live.conftest import Producer


def _drain(schedule: LiveSchedule, n: int | None = None) -> list[str]:
    out = []
    while n is None or len(out) < n:
        item = schedule.next()
        if item is None:
            break
        out.append(item[0])
    return out


def _ids(live_dir) -> LiveSet:
    return LiveSet(live_dir, min_samples=1, poll_seconds=0.01)


def test_each_sample_gets_its_visits_one_per_round_and_new_ones_join_at_the_boundary(tmp_path):
    prod = Producer(tmp_path / "proj", tmp_path / "work")
    prod.deliver(0, 3)
    sched = LiveSchedule(_ids(tmp_path / "proj/data/live"), lambda e: [e["id"]], visits=2,
                         seed=1)
    first = _drain(sched, 3)                 # round 1: the 3 samples there
    prod.deliver(3, 2)
    prod.done()
    rest = _drain(sched)
    order = first + rest
    assert sorted(first) == prod.sent[:3]
    assert Counter(order) == {sid: 2 for sid in prod.sent}  # 2 visits each, no more
    assert sorted(order[3:8]) == sorted(prod.sent)          # round 2: old + new
    assert sorted(order[8:]) == prod.sent[3:]                # round 3: the new ones' 2nd
    assert sched.finished and sched.rounds_started(len(order)) == 3
    assert sched.size_at(3) == 3 and sched.size_at(4) == 5


def test_growth_every_n_records_joins_mid_round(tmp_path):
    prod = Producer(tmp_path / "proj", tmp_path / "work")
    prod.deliver(0, 6)
    sched = LiveSchedule(_ids(tmp_path / "proj/data/live"), lambda e: [e["id"]], visits=1,
                         grow_every=2)
    head = _drain(sched, 3)
    prod.deliver(6, 2)
    prod.done()
    order = head + _drain(sched)
    assert sched.rounds_started(len(order)) == 1            # joined mid-round, no new round
    assert sorted(order) == prod.sent and len(order) == 8
    assert [e["pos"] for e in sched.events] == [0, 4]       # the next multiple of 2


def test_a_replay_from_a_checkpoint_state_continues_with_exactly_the_rest(tmp_path):
    prod = Producer(tmp_path / "proj", tmp_path / "work")
    prod.deliver(0, 4)
    live = _ids(tmp_path / "proj/data/live")
    sched = LiveSchedule(live, lambda e: [e["id"]], visits=2, seed=5)
    head = _drain(sched, 6)
    prod.deliver(4, 3)
    head += _drain(sched, 4)                 # ran ahead of what was trained
    state = json.loads(json.dumps(sched.state_at(5)))  # trained: 5; as a checkpoint stores it
    assert state["trained"] == 5 and len(state["live"]["consumed"]) == 4

    again = restore(_ids(tmp_path / "proj/data/live"), state, lambda e: [e["id"]])
    prod.deliver(7, 2)
    prod.done()
    resumed = head[:5] + _drain(again)
    assert resumed[:5] == head[:5]
    assert Counter(resumed) == {sid: 2 for sid in prod.sent}  # none repeated, none skipped
    assert resumed[5:10] != [] and again.finished
