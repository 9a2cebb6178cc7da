"""The server's staging writers: every file checked and written, one folder's files on one
thread (two threads creating in one folder spin on its lock)."""

from __future__ import annotations

import builtins
import hashlib
import threading
import time

import pytest

from remoteops.common.manifest import BundleError
from remoteops.server import stage_writers
from remoteops.server.stage_writers import StageWriters


def test_each_folders_files_are_written_by_one_thread_and_all_arrive(tmp_path, monkeypatch):
    seen: dict[str, set[int]] = {}
    lock = threading.Lock()

    def recording_open(path, *args, **kwargs):
        with lock:
            seen.setdefault(str(path.parent), set()).add(threading.get_ident())
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(stage_writers, "open", recording_open, raising=False)
    files = {}
    for d in range(12):
        (tmp_path / f"d{d}").mkdir()
        for f in range(30):
            files[tmp_path / f"d{d}" / f"f{f}"] = f"{d}/{f} ".encode() * (f + 1)
    writers = StageWriters(threads=4)
    for out, data in files.items():
        writers.put(str(out), out, hashlib.sha256(data).hexdigest(), data)
    writers.finish()
    assert all(out.read_bytes() == data for out, data in files.items())
    assert len(seen) == 12 and all(len(ids) == 1 for ids in seen.values()), seen
    assert len(set().union(*seen.values())) > 1  # the folders are spread over the threads


def test_a_file_that_does_not_match_its_sha256_is_not_written_and_raised(tmp_path):
    writers = StageWriters(threads=2)
    good, bad = tmp_path / "good", tmp_path / "bad"
    writers.put("good", good, hashlib.sha256(b"a").hexdigest(), b"a")
    writers.put("bad", bad, hashlib.sha256(b"b").hexdigest(), b"tampered")
    with pytest.raises(BundleError, match="bad in the upload does not match its sha256"):
        writers.finish()
    assert good.read_bytes() == b"a" and not bad.exists()


def test_a_busy_folder_does_not_hold_back_the_others(tmp_path, monkeypatch):
    """A tar holds a folder's files one after the other: while one folder's writer is busy,
    the files of the next folders are handed to the other threads (a queue of 16 per thread
    stopped the reader at the 17th file of the busy folder)."""
    release = threading.Event()

    def slow_open(path, *args, **kwargs):
        if path.parent.name == "busy":
            assert release.wait(30)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(stage_writers, "open", slow_open, raising=False)
    (tmp_path / "busy").mkdir()
    writers = StageWriters(threads=4)
    handed = threading.Event()
    # the routing is by folder (``hash``): three folders on other threads than the busy
    # one's, two on its thread
    busy = hash(tmp_path / "busy") % 4
    on = {d: hash(tmp_path / f"d{d}") % 4 == busy for d in range(400)}
    folders = [d for d in on if not on[d]][:3] + [d for d in on if on[d]][:2]

    def read_tar() -> None:
        for i in range(40):
            out = tmp_path / "busy" / f"f{i}"
            writers.put(str(out), out, hashlib.sha256(b"x").hexdigest(), b"x")
        for d in folders:
            (tmp_path / f"d{d}").mkdir()
            out = tmp_path / f"d{d}" / "f"
            writers.put(str(out), out, hashlib.sha256(b"y").hexdigest(), b"y")
        handed.set()

    reader = threading.Thread(target=read_tar, daemon=True)
    reader.start()
    try:
        assert handed.wait(10), "the reader waited for the busy folder's writer"
        # the folders on another thread than the busy one's are written meanwhile
        others = [tmp_path / f"d{d}" / "f" for d in folders[:3]]
        deadline = time.monotonic() + 10
        while not all(p.exists() for p in others) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(p.exists() for p in others)
        assert not any((tmp_path / "busy" / f"f{i}").exists() for i in range(40))
    finally:
        release.set()
    writers.finish()
    assert all((tmp_path / "busy" / f"f{i}").read_bytes() == b"x" for i in range(40))
    assert all((tmp_path / f"d{d}" / "f").read_bytes() == b"y" for d in folders)
    assert len(folders) == 5


def test_what_waits_to_be_written_is_bounded_by_bytes(tmp_path, monkeypatch):
    release = threading.Event()

    def held_open(path, *args, **kwargs):
        assert release.wait(30)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(stage_writers, "open", held_open, raising=False)
    writers = StageWriters(threads=2, ahead=1000)
    data = b"z" * 300
    done = []

    def read_tar() -> None:
        for i in range(5):
            out = tmp_path / f"f{i}"
            writers.put(str(out), out, hashlib.sha256(data).hexdigest(), data)
            done.append(i)

    reader = threading.Thread(target=read_tar, daemon=True)
    reader.start()
    reader.join(0.5)
    assert done == [0, 1, 2]  # a fourth file of 300 bytes would hold more than 1,000
    release.set()
    reader.join(10)
    writers.finish()
    assert done == [0, 1, 2, 3, 4]
    assert all((tmp_path / f"f{i}").read_bytes() == data for i in range(5))


def test_without_threads_each_file_is_checked_and_written_by_the_caller(tmp_path, monkeypatch):
    """A server with two cores or fewer writes inline: the file is on disk when ``put``
    returns, in the calling thread, and a mismatch is raised by that ``put``."""
    threads = []

    def recording_open(path, *args, **kwargs):
        threads.append(threading.get_ident())
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(stage_writers, "open", recording_open, raising=False)
    writers = StageWriters(threads=0)
    out = tmp_path / "a"
    writers.put("a", out, hashlib.sha256(b"abc").hexdigest(), b"abc", 0o751)
    assert out.read_bytes() == b"abc" and (out.stat().st_mode & 0o777) == 0o751
    assert threads == [threading.get_ident()]
    with pytest.raises(BundleError, match="b in the upload does not match its sha256"):
        writers.put("b", tmp_path / "b", hashlib.sha256(b"b").hexdigest(), b"tampered")
    assert not (tmp_path / "b").exists()
    writers.finish()


@pytest.mark.parametrize("cores, expected", [(1, 0), (2, 0), (4, stage_writers.THREADS)])
def test_writer_threads_follow_the_cores_this_process_may_use(monkeypatch, cores, expected):
    monkeypatch.setattr(stage_writers.os, "sched_getaffinity", lambda pid: set(range(cores)),
                        raising=False)
    assert stage_writers.writer_threads() == expected
    writers = StageWriters()
    assert len(writers._threads) == expected
    writers.finish()
