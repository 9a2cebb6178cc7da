"""The reader side a trainer will use: wait visibly for min_samples while batches arrive
through the real receive path, take each sample once, resume from a checkpoint's state with
exactly the unconsumed samples, and refuse a resume whose consumed samples changed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from remoteops.common.errors import RemoteOpsError
from remoteops.common.live_set import LiveSet
from remoteops.laptop.sync_source import Sample, write_batch
from remoteops.server.data_receive import mark_complete, receive_batch


def _deliver(root: Path, work: Path, first: int, n: int) -> None:
    batch = [Sample(f"s{i:03d}.json", data=json.dumps({"i": i}).encode() + b"\n",
                    bytes=8) for i in range(first, first + n)]
    tar, sha = write_batch(batch, work)
    receive_batch(str(root), "data/live", str(tar), sha)


def test_wait_take_checkpoint_and_resume_exactly(tmp_path):
    root, work = tmp_path / "proj", tmp_path / "work"
    work.mkdir()
    live = LiveSet(root / "data" / "live", min_samples=5, poll_seconds=0.02)
    shown: list[str] = []

    def producer():
        for first in (0, 2, 4, 6):
            time.sleep(0.15)
            _deliver(root, work, first, 2)

    thread = threading.Thread(target=producer)
    thread.start()
    count = live.wait_ready(shown.append)
    assert count >= 5
    assert shown[0] == "waiting for data 0/5" and "waiting for data 2/5" in shown
    first = live.take_new()
    assert [e["id"] for e in first] == [f"s{i:03d}.json" for i in range(count)]
    assert live.path_of(first[0]).read_text() == '{"i": 0}\n'
    state = json.loads(json.dumps(live.state()))  # as a checkpoint stores it
    thread.join()
    _deliver(root, work, 8, 3)
    mark_complete(str(root), "data/live")

    again = LiveSet(root / "data" / "live", min_samples=5, poll_seconds=0.02)
    again.resume(state)
    rest = again.take_new()
    assert state["consumed"] == [e["id"] for e in first]
    # the checkpoint's samples, then exactly the rest: each once, in arrival order
    assert state["consumed"] + [e["id"] for e in rest] == [f"s{i:03d}.json" for i in range(11)]
    assert again.complete() and again.take_new() == []


def test_a_resume_over_changed_or_missing_samples_is_refused(tmp_path):
    root, work = tmp_path / "proj", tmp_path / "work"
    work.mkdir()
    _deliver(root, work, 0, 3)
    live = LiveSet(root / "data" / "live")
    live.take_new()
    state = live.state()
    manifest = root / "data" / "live" / ".manifest.jsonl"
    lines = [json.loads(l) for l in manifest.read_text().splitlines()]
    lines[1]["sha256"] = "0" * 64
    manifest.write_text("".join(json.dumps(l) + "\n" for l in lines))
    with pytest.raises(RemoteOpsError, match="changed in .* since"):
        LiveSet(root / "data" / "live").resume(state)
    manifest.write_text("".join(json.dumps(l) + "\n" for l in lines[:1]))
    with pytest.raises(RemoteOpsError, match="no longer lists"):
        LiveSet(root / "data" / "live").resume(state)


def test_complete_with_too_few_or_none(tmp_path):
    root, work = tmp_path / "proj", tmp_path / "work"
    work.mkdir()
    empty = LiveSet(root / "data" / "live", min_samples=3, poll_seconds=0.01)
    mark_complete(str(root), "data/live")
    with pytest.raises(RemoteOpsError, match="marked complete with no samples"):
        empty.wait_ready()
    (root / "data" / "live" / ".complete").unlink()
    _deliver(root, work, 0, 2)
    mark_complete(str(root), "data/live")
    assert LiveSet(root / "data" / "live", min_samples=3).wait_ready() == 2
    stopped = LiveSet(tmp_path / "other", min_samples=3, poll_seconds=0.01)
    with pytest.raises(RemoteOpsError, match="stopped while waiting for data 0/3"):
        stopped.wait_ready(stop=lambda: True)
