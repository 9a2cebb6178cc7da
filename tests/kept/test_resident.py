"""The resident agent (server/resident) driven through its frames, as the keeper drives it.

It runs from a copy of the toolkit (PYTHONPATH), so a test can change that copy's files
as an upgrade would and see the resident refuse to run stale code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from remoteops.common.kept_wire import (END, ERR, EXIT, HELLO, INPUT, NOT_STARTED, OUT, READY,
                                        REQUEST, STARTED, Frames, frame, json_frame)
from remoteops.common.wire import parse_marked

REPO = Path(__file__).resolve().parents[2]


class Resident:
    def __init__(self, pythonpath: Path):
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        self.proc = subprocess.Popen([sys.executable, "-m", "remoteops.agent", "resident",
                                      "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, bufsize=0,
                                     cwd=pythonpath)  # -m puts the cwd first on sys.path
        head = self.proc.stdout.read(len(READY))
        assert head == READY, head + self.proc.stderr.read()
        self.frames = Frames()
        self.pending: list = []
        kind, hello = self.next()
        assert kind == HELLO and json.loads(hello)["pid"] == self.proc.pid

    def next(self):
        while not self.pending:
            data = self.proc.stdout.read(65536)
            if not data:
                return None
            self.pending += self.frames.feed(data)
        return self.pending.pop(0)

    def request(self, argv: list[str], stdin: bytes = b"", end: bool = True) -> dict:
        self.proc.stdin.write(json_frame(REQUEST, {"argv": argv}))
        first = self.next()
        if first[0] != STARTED:
            return {"started": False, "said": first}
        if stdin:
            self.proc.stdin.write(frame(INPUT, stdin))
        if end:
            self.proc.stdin.write(frame(END))
        out, err = b"", b""
        while True:
            kind, payload = self.next()
            if kind == EXIT:
                return {"started": True, "code": int(payload), "out": out.decode(),
                        "err": err.decode(), "child": json.loads(first[1])["pid"]}
            out += payload if kind == OUT else b""
            err += payload if kind == ERR else b""

    def close(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(30)


@pytest.fixture
def copy(tmp_path) -> Path:
    shutil.copytree(REPO / "remoteops", tmp_path / "remoteops",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_requests_run_in_fresh_children_with_their_answers_and_exit_codes(copy, tmp_path):
    resident = Resident(copy)
    try:
        empty = resident.request(["backups", "--root", str(tmp_path / "none"), "--json"])
        assert empty["code"] == 0 and parse_marked(empty["out"]) == {"backups": []}
        bad = resident.request(["no-such-command"])
        assert bad["code"] == 2 and "No such command 'no-such-command'" in bad["err"]
        # a deploy request whose stdin is not one: one error line, changes nothing
        broken = resident.request(["deploy-stream", "--root", str(tmp_path / "root"), "--json"],
                                  stdin=b"this is not a deploy\n")
        assert broken["code"] != 0 and broken["err"].startswith("error: ")
        assert not (tmp_path / "root" / "code").exists()
        again = resident.request(["version", "--json"])
        assert again["code"] == 0 and json.loads(again["out"])["python"]
        children = {r["child"] for r in (empty, bad, broken, again)}
        assert len(children) == 4 and resident.proc.pid not in children
    finally:
        assert resident.close() == 0


def test_a_changed_toolkit_is_never_run_stale(copy):
    resident = Resident(copy)
    assert resident.request(["version", "--json"])["code"] == 0
    # an upgrade rewrites the installed files (pip writes new ones)
    module = copy / "remoteops" / "server" / "apply.py"
    module.write_text(module.read_text() + "\n# upgraded\n")
    said = resident.request(["version", "--json"])
    assert said == {"started": False, "said": (NOT_STARTED, b"stale")}
    assert resident.proc.wait(30) == 0  # it leaves; the keeper starts a new one


def test_a_closed_channel_ends_the_request_input_and_the_resident(copy, tmp_path):
    """The keeper's connection closes in the middle of a request: the child reads the end
    of its input (a deploy without its go-ahead changes nothing) and the resident exits."""
    resident = Resident(copy)
    resident.proc.stdin.write(json_frame(REQUEST, {"argv": [
        "deploy-stream", "--root", str(tmp_path / "root"), "--json"]}))
    assert resident.next()[0] == STARTED
    resident.proc.stdin.write(frame(INPUT, b"@@REMOTEOPS"))  # the start of a header, no more
    resident.proc.stdin.close()
    assert resident.proc.wait(30) == 0
    assert not (tmp_path / "root" / "code").exists()


@pytest.mark.skipif(not hasattr(__import__("fcntl"), "F_GETPIPE_SZ"), reason="Linux pipes")
def test_the_pipes_a_deploy_passes_hold_a_megabyte(copy, tmp_path):
    """sshd's pipe into the resident and each request's stdin pipe are grown to 1 MB (at the
    default 64 KB the processes of a deploy took turns, every 64 KB)."""
    import fcntl

    resident = Resident(copy)
    try:
        assert fcntl.fcntl(resident.proc.stdin.fileno(), fcntl.F_GETPIPE_SZ) == 1 << 20
        resident.proc.stdin.write(json_frame(REQUEST, {"argv": [
            "deploy-stream", "--root", str(tmp_path / "root"), "--json"]}))
        kind, started = resident.next()
        assert kind == STARTED
        child = json.loads(started)["pid"]  # it waits for its input: its stdin is open
        fd = os.open(f"/proc/{child}/fd/0", os.O_WRONLY | os.O_NONBLOCK)
        try:
            assert fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) == 1 << 20
        finally:
            os.close(fd)
        resident.proc.stdin.write(frame(END))
        while resident.next()[0] != EXIT:
            pass
    finally:
        assert resident.close() == 0
