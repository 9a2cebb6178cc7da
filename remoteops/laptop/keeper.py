"""The keeper: a background process holding one logged-in connection and a resident agent.

Started by a command that found none (``laptop/kept``), as ``python -m
remoteops.laptop.keeper --host SPEC --key KEY`` in the project folder. It resolves
the host exactly as the command did (and exits if the result has another key), logs
in, starts ``python -m remoteops.agent resident --json`` on the server over that
connection (``[ssh] client`` when chosen, else ``auto``: the ``ssh`` binary wherever it
can express the host exactly, see ``laptop/kept.keeper_client``), then
listens on its socket. Each request is passed on as frames and the answer passed back
(``common/kept_wire``); one at a time (a second command is told ``busy`` and connects
as always). It exits after ``[ssh] persist`` seconds without a request, when the
connection or the resident ends, or on SIGTERM; its socket goes with it. Its log is
next to the socket (``<key>.log``).

A command that disappears mid-request (Ctrl-C, a crash) closes its socket: the keeper
ends the request's stdin, so a deploy without its go-ahead changes nothing, and reads
the request to its end before taking the next.

A request's input goes from the command's socket to the ``ssh`` client's stdin by the
kernel (``splice``: a full deploy's bytes never enter this process); the frames are
read exactly, header by header. A command that disappears in the middle of a frame
leaves the server's side of it incomplete: the keeper then closes the connection (the
request ends without its go-ahead) and the next command logs in as always. Through
paramiko the payload is read and written.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import queue
import select
import signal
import socket
import threading
import time

from remoteops.common.errors import RemoteOpsError
from remoteops.common.files import write_atomic_text
from remoteops.common.kept_wire import (END, EXIT, HEAD, HELLO, INPUT, LOST, NOT_STARTED,
                                        READY, REQUEST, STARTED, Frames, FrameError,
                                        check_head, frame)

log = logging.getLogger("remoteops.keeper")
HELLO_SECONDS = 60.0


class Resident:
    """``remoteops.agent resident`` on the server, over the target's connection."""

    def __init__(self, target):
        from remoteops.laptop.agent_stream import AgentStream

        self.stream = AgentStream(target, ["resident"], timeout=HELLO_SECONDS)
        self.frames: queue.Queue = queue.Queue()
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        got = self.next(HELLO_SECONDS)
        if got is None or got[0] != HELLO:
            self.close()
            raise RemoteOpsError(f"the resident agent did not start on {target.name}: "
                                 f"{self.stream.error_text() or 'no answer'}")
        log.info("resident agent ready: %s", got[1].decode())

    def _read(self) -> None:
        seen, frames = b"", Frames()
        try:
            while True:
                data = self.stream.read_out()
                if data is None:
                    break
                if seen is not None:  # skip what a login shell printed before it
                    seen += data
                    at = seen.find(READY)
                    if at < 0:
                        seen = seen[-len(READY):]
                        continue
                    data, seen = seen[at + len(READY):], None
                for item in frames.feed(data):
                    self.frames.put(item)
        except FrameError as exc:
            log.warning("resident sent something else: %s", exc)
        self.ended.set()
        self.frames.put(None)

    def next(self, timeout: float | None = None):
        try:
            return self.frames.get(timeout=timeout)
        except queue.Empty:
            return None

    def send(self, data: bytes) -> bool:
        self.stream.send(data)
        return not self.stream.closed

    def send_spliced(self, head: bytes, conn: socket.socket, size: int) -> bool | None:
        """A frame whose ``size``-byte payload is still on ``conn``, moved into the ``ssh``
        client's stdin by the kernel. None: not possible here (nothing was sent: the
        caller reads and sends it); False: the payload broke off (``conn`` ended, or the
        ``ssh`` client did): the frame on the way to the server is incomplete."""
        fd = self.stream.input_fd()
        if fd is None or not hasattr(os, "splice"):
            return None
        try:
            os.write(fd, head)  # whole: a pipe takes 5 bytes at once
            left = size
            while left:
                n = os.splice(conn.fileno(), fd, min(left, 1 << 20))
                if n <= 0:
                    return False
                left -= n
        except OSError:
            self.stream.closed = True
            return False
        return True

    def close(self) -> None:
        self.stream.cancel()


class Keeper:
    def __init__(self, target, kept):
        self.target, self.kept = target, kept
        self.resident = Resident(target)
        self.busy = threading.Lock()
        self.dead = False
        self.last = time.monotonic()

    def start(self, argv_frame: bytes):
        """Ask the resident to start a request (a new resident once, if it is stale)."""
        for attempt in range(2):
            if not self.resident.send(argv_frame):
                break
            # the resident forks at once: no answer in the connect timeout means the link
            # died unnoticed (a laptop that slept): give up, a command starts a new keeper
            got = self.resident.next(max(5.0, self.kept.start_timeout))
            if got is None:
                log.warning("the resident agent did not answer: closing")
                break
            if got[0] == NOT_STARTED and got[1] == b"stale" and attempt == 0:
                log.info("the server's toolkit changed: starting a new resident agent")
                self.resident.close()
                try:
                    self.resident = Resident(self.target)
                except RemoteOpsError as exc:
                    log.warning("%s", exc)
                    break
                continue
            return got
        self.dead = True
        return None

    def handle(self, conn: socket.socket) -> None:
        # a request that just ended may still be closing: wait a moment, then say busy
        if not self.busy.acquire(timeout=1.0):
            _send(conn, frame(NOT_STARTED, b"busy"))
            conn.close()
            return
        pumping = None
        try:
            pumping = self._serve(conn)
        finally:
            self.last = time.monotonic()
            self.busy.release()
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if pumping is not None:
                pumping.join(5)
            conn.close()

    def _serve(self, conn: socket.socket) -> threading.Thread | None:
        """One request: start it, pump the command's input to it, pass frames back until its
        exit code; returns the thread still reading the command's socket."""
        conn.settimeout(10)
        try:
            first = _read_frame(conn)
        except (OSError, FrameError):
            return None
        if first is None or first[0] != REQUEST:
            return None
        got = self.start(frame(REQUEST, first[1]))
        if got is None or got[0] != STARTED:
            _send(conn, frame(NOT_STARTED, b"closed" if got is None else got[1]))
            return None
        conn.settimeout(None)
        _send(conn, frame(*got))
        done = threading.Event()
        gate = threading.Lock()
        splice = [True]

        def forward(kind: bytes, payload: bytes) -> None:
            with gate:
                if not done.is_set() and kind in (INPUT, END):
                    self.resident.send(frame(kind, payload))

        def pump() -> None:  # the command's stdin, to the resident until it ends
            try:
                while True:
                    head = _read_exactly(conn, HEAD.size)
                    if head is None:
                        break
                    kind, size = check_head(head)
                    if kind == INPUT and size and splice[0]:
                        with gate:
                            if not done.is_set():
                                moved = self.resident.send_spliced(head, conn, size)
                                if moved is False:  # a frame half sent: end the connection
                                    log.warning("a command's input broke off mid-frame: "
                                                "closing the connection")
                                    self.dead = True
                                    self.resident.close()
                                    return
                                if moved:
                                    continue
                                splice[0] = False
                    payload = _read_exactly(conn, size) if size else b""
                    if payload is None:
                        break
                    forward(kind, payload)
            except (OSError, FrameError):
                pass
            forward(END, b"")  # the command went away: its request's input ends

        pumping = threading.Thread(target=pump, daemon=True)
        pumping.start()
        while True:
            got = self.resident.next()
            if got is None:
                self.dead = True
                _send(conn, frame(LOST))
                break
            _send(conn, frame(*got))
            if got[0] == EXIT:
                break
        with gate:
            done.set()  # nothing more reaches the resident from this command
        return pumping

    def serve(self, server: socket.socket) -> None:
        while not self.dead and not (self.resident.ended.is_set() and not self.busy.locked()):
            idle = self.kept.persist - (time.monotonic() - self.last)
            if idle <= 0 and not self.busy.locked():
                log.info("no request for %.0fs: closing", self.kept.persist)
                return
            readable, _, _ = select.select([server], [], [], max(0.05, min(idle, 1.0)))
            if not readable:
                continue
            conn, _ = server.accept()
            if _peer_uid(conn) != os.getuid():
                conn.close()
                continue
            self.last = time.monotonic()
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
        log.info("the connection or the resident agent ended: closing")


def _read_exactly(conn: socket.socket, n: int) -> bytes | None:
    """``n`` bytes from ``conn`` (never more: what follows may be moved by the kernel); None
    when it ends first."""
    parts, left = [], n
    while left:
        data = conn.recv(left)
        if not data:
            return None
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def _read_frame(conn: socket.socket) -> tuple[bytes, bytes] | None:
    head = _read_exactly(conn, HEAD.size)
    if head is None:
        return None
    kind, size = check_head(head)
    payload = _read_exactly(conn, size) if size else b""
    return None if payload is None else (kind, payload)


def _send(conn: socket.socket, data: bytes) -> None:
    try:
        conn.sendall(data)
    except OSError:
        pass  # the command went away; the request still runs to its end


def _peer_uid(conn: socket.socket) -> int:
    import struct

    if not hasattr(socket, "SO_PEERCRED"):  # not Linux: the 0700 folder is the guard
        return os.getuid()
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]  # struct ucred: pid, uid, gid


def _stop(*_) -> None:
    log.info("asked to stop (SIGTERM): closing")
    raise SystemExit(0)  # in the main thread: the socket and the connection are closed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="remoteops-keeper", description=(
        "Hold one logged-in connection and a resident agent for the deploys of this project "
        "(started by remoteops itself; [ssh] persist = 0 turns it off)."))
    parser.add_argument("--host", required=True, help="the host, as given to --host")
    parser.add_argument("--key", required=True, help="the kept connection's key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s keeper {os.getpid()} "
                        "%(levelname)s %(message)s")
    from remoteops.common.config import load_settings
    from remoteops.laptop.targets import open_target

    try:
        target = open_target(load_settings(), args.host)
    except RemoteOpsError as exc:
        log.warning("cannot resolve %s: %s", args.host, exc)
        return 2
    kept = getattr(target, "kept", None)
    if kept is None or kept.key != args.key:
        log.info("%s resolves differently now: not keeping it", args.host)
        return 2
    target.kept = None  # its own requests go over the connection it holds
    lock = open(kept.lock_path, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another keeper holds this connection
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")  # who holds it (for `remoteops connections` and tests)
    lock.flush()
    signal.signal(signal.SIGTERM, _stop)
    server = keeper = None
    try:
        keeper = Keeper(target, kept)
        path = kept.socket_path
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(str(path))
        finally:
            os.umask(old)
        server.listen(8)
        try:
            kept.failed_path.unlink()
        except FileNotFoundError:
            pass
        write_atomic_text(kept.info_path, json.dumps({
            "pid": os.getpid(), "host": args.host, "target": target.name,
            "project": str(kept.project_dir), "started": time.time(), "persist": kept.persist,
            "via": "ssh" if target.openssh is not None else "paramiko"}))
        log.info("keeping %s for %s (idle limit %.0fs)", target.name, args.key, kept.persist)
        keeper.serve(server)
        return 0
    except RemoteOpsError as exc:
        log.warning("%s", exc)
        write_atomic_text(kept.failed_path, str(exc))  # commands wait before trying again
        return 1
    finally:
        if server is not None:
            server.close()
            for path in (kept.socket_path, kept.info_path):
                try:
                    path.unlink()
                except OSError:
                    pass
        if keeper is not None:
            keeper.resident.close()
        target.close()
        log.info("closed")


if __name__ == "__main__":
    raise SystemExit(main())
