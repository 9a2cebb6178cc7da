"""A command's side of a kept request when the request is short: its answer and exit code
may come before the command has read its start, or before it has sent the end of its
input. Both are a finished request, not a lost connection (each made ``Kept.run`` say
"the kept connection ended" under load: a rollback or a listing in CI, ~1 run in 6 of
``tests/kept`` beside a busy core)."""

from __future__ import annotations

import socket
import tempfile
import threading
from pathlib import Path

import pytest

from remoteops.common.errors import ConnectError
from remoteops.common.kept_wire import ERR, EXIT, OUT, REQUEST, STARTED, Frames, frame, json_frame
from remoteops.laptop import kept as kept_mod
from remoteops.laptop.kept import Kept


def _read_frame(conn: socket.socket) -> tuple[bytes, bytes]:
    frames, got = Frames(), []
    while not got:
        data = conn.recv(65536)
        assert data, "the command closed before its request"
        got = frames.feed(data)
    return got[0]


@pytest.fixture
def fake_keeper():
    """``serve(answer)``: a keeper's socket that takes one request, sends ``answer`` (bytes)
    and closes at once, without reading the end of the request's input. Returns the Kept
    that finds it and an Event set once the socket is closed."""
    folder = Path(tempfile.mkdtemp(prefix="ro-fk-"))  # short: a socket path is short
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(folder / "k.sock"))
    server.listen(1)
    closed = threading.Event()
    requests: list = []

    def serve(answer: bytes):
        def run() -> None:
            conn, _ = server.accept()
            requests.append(_read_frame(conn))
            conn.sendall(answer)
            conn.shutdown(socket.SHUT_RDWR)
            conn.close()
            closed.set()

        threading.Thread(target=run, daemon=True).start()
        return Kept("k", folder, "box", folder, 60.0, 5.0), closed

    yield serve
    server.close()
    assert [kind for kind, _ in requests] == [REQUEST]
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


def test_an_exit_code_that_came_with_the_start_is_the_answer(fake_keeper):
    # the keeper's frames arrive in one piece: started, its output, its exit code
    kept, _ = fake_keeper(json_frame(STARTED, {"pid": 1}) + frame(OUT, b'{"ok": 1}\n')
                          + frame(ERR, b"note\n") + frame(EXIT, b"3"))
    assert kept.run(["backups", "--json"], 10, "box") == ('{"ok": 1}\n', "note\n", 3)


def test_a_request_that_ended_before_its_input_was_closed_still_answers(fake_keeper,
                                                                        monkeypatch):
    kept, closed = fake_keeper(json_frame(STARTED, {"pid": 1}) + frame(OUT, b"v\n")
                               + frame(EXIT, b"0"))
    original = kept_mod.KeptRequest.close_input

    def late_close_input(self) -> None:
        assert closed.wait(10)  # the keeper has answered and closed its side already
        original(self)  # the end of the input goes nowhere (EPIPE)

    monkeypatch.setattr(kept_mod.KeptRequest, "close_input", late_close_input)
    assert kept.run(["version", "--json"], 10, "box") == ("v\n", "", 0)


def test_a_request_whose_keeper_went_away_is_still_a_lost_connection(fake_keeper):
    kept, _ = fake_keeper(json_frame(STARTED, {"pid": 1}) + frame(OUT, b"partial"))
    with pytest.raises(ConnectError, match="the kept connection ended"):
        kept.run(["rollback"], 10, "box")

