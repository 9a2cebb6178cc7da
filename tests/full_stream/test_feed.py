"""``early_stage.Feed``: the upload's bytes handed from the receiving thread to the
extracting one, in memory. Real threads, real bytes."""

from __future__ import annotations

import random
import threading

import pytest

from remoteops.server.early_stage import Feed


def _reader(feed: Feed, sizes: list[int], out: list[bytes]) -> threading.Thread:
    def run() -> None:
        i = 0
        while True:
            data = feed.read(sizes[i % len(sizes)])
            i += 1
            if not data:
                return
            out.append(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_every_byte_arrives_in_order_and_the_writer_waits_while_the_reader_is_behind():
    rng = random.Random(7)
    feed = Feed()
    feed.LIMIT = 50_000  # small, so the writer waits many times
    chunks = [rng.randbytes(rng.randint(1, 40_000)) for _ in range(300)]
    out: list[bytes] = []
    reader = _reader(feed, [1, 512, 4096, 131_075, 7], out)
    for chunk in chunks:
        feed.put(chunk)
        assert feed._unread <= feed.LIMIT + len(chunk)
    feed.close_writer()
    reader.join(30)
    assert not reader.is_alive()
    assert b"".join(out) == b"".join(chunks)


def test_a_reader_that_stopped_never_blocks_the_writer():
    feed = Feed()
    feed.LIMIT = 1000
    feed.put(b"x" * 1000)  # full now: the next put waits for the reader
    done = threading.Event()

    def write() -> None:
        for _ in range(100):
            feed.put(b"y" * 1000)
        done.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    assert not done.wait(0.3)  # waiting for room
    feed.close()  # the extractor gave up (a refused member): the rest is dropped
    assert done.wait(10)


def test_a_failed_upload_ends_a_waiting_reader_with_an_error():
    feed = Feed()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            feed.read(100)
        except OSError as exc:
            errors.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()  # nothing arrived yet: it waits
    feed.fail()
    reader.join(10)
    assert [str(e) for e in errors] == ["the upload stopped"]
    with pytest.raises(OSError):
        feed.read(1)
