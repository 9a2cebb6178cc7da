"""The server's staging writers: every file checked and written, one folder's files on one
thread (two threads creating in one folder spin on its lock)."""

from __future__ import annotations

import builtins
import hashlib
import threading

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
