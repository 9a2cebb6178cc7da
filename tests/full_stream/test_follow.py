"""``Follow``: the reader that stages a full deploy from its part file while it arrives.

A reader that caught up with the upload waits for the receiver's ``grew`` (or the end),
not for a sleep to run out. Each test sets the fallback wait far beyond its own
timeout, so only the wake-up can make it pass.
"""

from __future__ import annotations

import threading

import pytest

from remoteops.server.early_stage import Follow


@pytest.fixture
def follow(tmp_path, monkeypatch):
    monkeypatch.setattr(Follow, "WAIT", 120.0)
    part = tmp_path / "upload.part"
    part.write_bytes(b"")
    reader = Follow(part)
    yield part, reader
    reader.close()


def _read_in_thread(reader: Follow) -> tuple[threading.Thread, dict]:
    got: dict = {}

    def run() -> None:
        buffer = bytearray(64)
        try:
            n = reader.readinto(buffer)
            got["data"] = bytes(buffer[:n])
        except OSError as exc:
            got["error"] = str(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


def test_a_reader_that_caught_up_goes_on_when_the_file_grows(follow):
    part, reader = follow
    thread, got = _read_in_thread(reader)
    thread.join(0.2)
    assert thread.is_alive()  # nothing to read yet: it waits
    with open(part, "ab") as fh:
        fh.write(b"first piece")
    reader.grew()
    thread.join(10)
    assert not thread.is_alive()
    assert got == {"data": b"first piece"}


@pytest.mark.parametrize("how,result", [
    ("close_writer", {"data": b""}),  # the end of the file: the tar reader sees the end
    ("fail", {"error": "the upload stopped"}),
])
def test_the_end_or_a_stop_of_the_upload_ends_a_waiting_read(follow, how, result):
    _, reader = follow
    thread, got = _read_in_thread(reader)
    thread.join(0.2)
    getattr(reader, how)()
    thread.join(10)
    assert got == result
