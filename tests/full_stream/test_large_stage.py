"""A large staged file: written as it is read, its sha256 made by a second thread."""

from __future__ import annotations

import hashlib
import io
import threading
import types

import pytest

from remoteops.common.manifest import BundleError
from remoteops.server import incoming


def _recording_hashlib(seen: list[str]):
    class Recording:
        def __init__(self):
            self._h = hashlib.sha256()

        def update(self, data):
            seen.append(threading.current_thread().name)
            self._h.update(data)

        def hexdigest(self):
            return self._h.hexdigest()

    return types.SimpleNamespace(sha256=Recording)


def test_a_large_file_is_written_whole_and_hashed_beside_the_reading(tmp_path, monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(incoming, "hashlib", _recording_hashlib(seen))
    data = bytes(range(256)) * (5 * 4096 + 7)  # ~5 MB: several pieces
    out = tmp_path / "w.bin"
    incoming._write_large("w.bin", out, hashlib.sha256(data).hexdigest(), io.BytesIO(data),
                          0o640)
    assert out.read_bytes() == data and (out.stat().st_mode & 0o777) == 0o640
    assert len(seen) > 1 and set(seen) == {"remoteops-stage-sha256"}
    assert not [t for t in threading.enumerate() if t.name == "remoteops-stage-sha256"]


def test_a_large_file_that_does_not_match_its_sha256_is_refused(tmp_path):
    with pytest.raises(BundleError, match="w.bin in the upload does not match its sha256"):
        incoming._write_large("w.bin", tmp_path / "w.bin", hashlib.sha256(b"x").hexdigest(),
                              io.BytesIO(b"y" * (3 << 20)), 0o644)


def test_a_read_that_fails_midway_raises_and_leaves_no_hashing_thread(tmp_path):
    class Broken(io.RawIOBase):
        def __init__(self):
            self.calls = 0

        def read(self, n=-1):
            self.calls += 1
            if self.calls > 3:
                raise OSError("the upload stopped")
            return b"z" * n

    with pytest.raises(OSError, match="the upload stopped"):
        incoming._write_large("w.bin", tmp_path / "w.bin", "0" * 64, Broken(), 0o644)
    assert not [t for t in threading.enumerate() if t.name == "remoteops-stage-sha256"]
