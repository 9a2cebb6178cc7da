"""The resident agent: one Python on the server that runs the laptop's agent requests.

Every SSH command pays the login, the login shell, Python's start and the agent's
imports: on a quiet loopback about 0.3 s more than a redeploy's own work. The
laptop's kept connection (``laptop/keeper``) starts this once, as
``python -m remoteops.agent resident``, and sends it requests as frames
(``common/kept_wire``) on its stdin. For each request it forks: the child is a fresh
agent process with the modules already imported, whose stdin, stdout and stderr are
pipes this process relays to and from the frames. The child runs exactly what
``python -m remoteops.agent ARGS`` would (same entry, same answer, same exit code);
a crash in it cannot harm the next request. One request at a time.

A request's input (a full deploy's 100 MB and more) is moved from the SSH channel to
the child's stdin by the kernel (``splice``: the bytes never enter this process); the
frames are read exactly, header by header, so that this is possible. Where ``splice``
cannot be used the payload is read and written as before.

It never runs stale code: before each request it compares the toolkit's installed
files (name, size, mtime, inode) with those it started with; after an upgrade (the
deploy installs the bundle's wheel) it answers ``N stale`` and exits, and the keeper
starts a new one. When the SSH channel closes it stops taking requests; a request
under way gets the end of its stdin (``deploy-stream`` without its go-ahead changes
nothing) and runs to its end, as an agent whose SSH session was cut would.
"""

from __future__ import annotations

import collections
import json
import os
import select
import sys

import remoteops
from remoteops.common.files import grow_pipe, write_all
from remoteops.common.kept_wire import (END, ERR, EXIT, HEAD, HELLO, INPUT, NOT_STARTED, OUT,
                                        READY, REQUEST, STARTED, check_head, frame,
                                        json_frame)

_READ = 1 << 20
_QUEUE = 4 << 20  # the most of a request's input held here for its child


def fingerprint() -> tuple:
    """What identifies the installed toolkit's code: every file's name, size, mtime, inode."""
    top = os.path.dirname(os.path.abspath(remoteops.__file__))
    out = []
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".toml", ".json")):
                st = os.stat(os.path.join(folder, name))
                out.append((os.path.relpath(os.path.join(folder, name), top), st.st_size,
                            st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _preload() -> None:
    """What a request needs, imported once here rather than in every child."""
    import remoteops.server.agent.cli  # noqa: F401 - every agent command
    import remoteops.server.streamapply  # noqa: F401 - the deploy request
    import remoteops.server.stream_entry  # noqa: F401


class Channel:
    """Frames in on fd 0 and out on fd 1 (the SSH command's stdin and stdout). fd 0 is read
    exactly, a frame's header then its payload, never past the frame under way: the relay
    may move an input frame's payload itself (``splice``)."""

    def __init__(self) -> None:
        self.pending: list[tuple[bytes, bytes]] = []
        self.open = True
        self.broken = False  # the laptop stopped reading
        self.head = b""  # a header as it arrives
        self.kind: bytes | None = None  # the frame whose payload is under way
        self.left = 0  # its bytes still on fd 0
        self.body: list[bytes] = []

    def read(self) -> None:
        """Once fd 0 is readable: the next piece of the frame under way (complete frames go
        to ``pending``)."""
        if self.kind is None:
            data = os.read(0, HEAD.size - len(self.head))
            if not data:
                self.open = False
                return
            self.head += data
            if len(self.head) < HEAD.size:
                return
            kind, size = check_head(self.head)
            self.head = b""
            if size == 0:
                self.pending.append((kind, b""))
            else:
                self.kind, self.left, self.body = kind, size, []
            return
        data = os.read(0, min(self.left, _READ))
        if not data:
            self.open = False
            return
        self.body.append(data)
        self.moved(len(data))

    def splicing(self) -> bool:
        """An input frame's payload waits on fd 0, none of it read yet."""
        return self.kind == INPUT and self.left > 0 and not self.body

    def moved(self, n: int) -> None:
        """``n`` bytes of the payload under way were taken from fd 0."""
        self.left -= n
        if not self.left:
            if self.body:
                self.pending.append((self.kind, b"".join(self.body)))
            self.kind, self.body = None, []

    def next(self) -> tuple[bytes, bytes] | None:
        while not self.pending and self.open:
            self.read()
        return self.pending.pop(0) if self.pending else None

    def send(self, data: bytes) -> None:
        if not self.broken:
            try:
                write_all(1, data)
            except OSError:
                self.broken = True


def main(argv: list[str]) -> int:
    started_with = fingerprint()
    _preload()
    grow_pipe(0)  # what the laptop sends arrives through sshd's pipe
    channel = Channel()
    channel.send(READY)
    channel.send(json_frame(HELLO, {"pid": os.getpid(), "version": remoteops.__version__}))
    while True:
        got = channel.next()
        if got is None:
            return 0
        kind, payload = got
        if kind != REQUEST:
            continue  # the rest of a request that ended (input after its exit)
        if fingerprint() != started_with:
            channel.send(frame(NOT_STARTED, b"stale"))
            return 0
        code = serve(channel, json.loads(payload)["argv"])
        channel.send(frame(EXIT, str(code).encode()))


def serve(channel: Channel, argv: list[str]) -> int:
    """Run one request in a forked child; relay its stdin, stdout and stderr; its exit code."""
    r_in, w_in = os.pipe()
    grow_pipe(w_in)  # the request's input (a full deploy's bytes): common/files.grow_pipe
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: a fresh agent process
        try:
            os.dup2(r_in, 0)
            os.dup2(w_out, 1)
            os.dup2(w_err, 2)
            for fd in (r_in, w_in, r_out, w_out, r_err, w_err):
                os.close(fd)
            _run_child(argv)  # exits with the command's code
        finally:
            os._exit(1)  # only reached when the child could not be set up
    for fd in (r_in, w_out, w_err):
        os.close(fd)
    channel.send(json_frame(STARTED, {"pid": pid}))
    return _relay(channel, pid, w_in, r_out, r_err)


def _run_child(argv: list[str]) -> None:
    """``python -m remoteops.agent ARGV`` in this forked process; never returns."""
    code = 1
    try:
        sys.argv = ["remoteops-agent", *argv]
        from remoteops.server.stream_entry import run, wire_args

        root = wire_args(argv)
        if root is not None:
            code = run(root)
        else:
            from remoteops.server.agent.cli import main as agent

            agent(args=argv, prog_name="remoteops-agent")
            code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as an uncaught exception in a fresh process
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - nobody reads it any more
                pass
    os._exit(code)


def _relay(channel: Channel, pid: int, w_in: int, r_out: int, r_err: int) -> int:
    queue: collections.deque = collections.deque()  # the child's stdin, not yet written
    queued = 0
    ending = False  # the end of its stdin came (or the channel closed)
    outputs = {r_out: OUT, r_err: ERR}
    os.set_blocking(w_in, False)
    splice = hasattr(os, "splice")  # Linux: input payloads move fd 0 -> w_in in the kernel
    in_ready = out_ready = False  # (while splicing) fd 0 readable, w_in writable
    while outputs:  # until the child closed its stdout and stderr (it ended)
        # input frames parsed while waiting for the request are handled first
        while channel.pending:
            kind, payload = channel.pending.pop(0)
            if kind == INPUT and not ending and payload and w_in >= 0:
                queue.append(memoryview(payload))
                queued += len(payload)
            elif kind == END:
                ending = True
        if not channel.open:
            ending = True
        if ending and not queued and w_in >= 0:
            os.close(w_in)
            w_in = -1
        moving = splice and w_in >= 0 and not queued and channel.splicing()
        if moving and in_ready and out_ready:
            in_ready = out_ready = False
            try:
                n = os.splice(0, w_in, min(channel.left, _READ), flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                continue
            except BrokenPipeError:  # the child stopped reading: the rest is read and dropped
                os.close(w_in)
                w_in = -1
                continue
            except OSError:  # not possible with these descriptors: read and write instead
                splice = False
                continue
            if n:
                channel.moved(n)
            else:
                channel.open = False
            continue
        if moving:  # wait for whichever side is not ready yet (never spin on the other)
            reads = list(outputs) + ([0] if not in_ready else [])
            writes = [w_in] if not out_ready else []
        else:
            # no more from the laptop while the child has a few MB to read (backpressure)
            reads = list(outputs) + ([0] if channel.open and queued < _QUEUE else [])
            writes = [w_in] if queued and w_in >= 0 else []
        readable, writable, _ = select.select(reads, writes, [])
        if moving:
            in_ready = in_ready or 0 in readable
            out_ready = out_ready or bool(writable)
        elif writable:
            try:
                head = queue[0]
                written = os.write(w_in, head)
                queued -= written
                if written == len(head):
                    queue.popleft()
                else:
                    queue[0] = head[written:]
            except BlockingIOError:
                pass
            except OSError:  # the child stopped reading: what it has not read is dropped
                queue.clear()
                queued = 0
                os.close(w_in)
                w_in = -1
        for fd in readable:
            if fd == 0:
                if not moving:
                    channel.read()
                continue
            data = os.read(fd, _READ)
            if data:
                channel.send(frame(outputs[fd], data))
            else:
                os.close(fd)
                del outputs[fd]
    if w_in >= 0:
        os.close(w_in)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


__all__ = ["main", "fingerprint"]
