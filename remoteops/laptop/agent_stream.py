"""One agent command whose stdin is sent piece by piece while it runs (the one-request deploy).

``Target.run_agent`` sends a whole payload and waits; here the laptop starts the
command, sends its input as it becomes ready (``send``), and reads the JSON answer
at the end (``finish``), over one SSH channel (no SFTP, no second command) or a
local process. ``cancel`` closes the input without the final go-ahead: the
agent then changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
from typing import Any

from remoteops.common.errors import ConnectError, timed_out
from remoteops.common.files import grow_pipe
from remoteops.common.target import LocalTarget, Target, shell_path
from remoteops.common.wire import BEGIN, END
from remoteops.laptop.kept import kept_lost
from remoteops.laptop.openssh import CONNECTED
from remoteops.laptop.targets import SSHTarget

log = logging.getLogger(__name__)


def can_stream(target: Target) -> bool:
    return isinstance(target, (SSHTarget, LocalTarget))


# What an agent that cannot take a streamed request answers: an older agent, or a login
# shell (~/.bashrc) that reads stdin before the agent does. Then the SFTP path runs.
_NOT_STREAMABLE = ("No such command", "did not arrive on stdin")
STDIN_EVENT = ("the server's login shell reads stdin (~/.bashrc), so the deploy went by SFTP; "
               "put '[[ $- == *i* ]] || return' at the top of ~/.bashrc there")


def not_streamable(exc: Exception) -> bool:
    return any(text in str(exc) for text in _NOT_STREAMABLE)


def agent_command(target: Target, args: list[str]) -> str:
    return " ".join([shell_path(target.python), "-m", "remoteops.agent",
                     *(shell_path(a) for a in args), "--json"])


class AgentStream:
    """``remoteops-agent ARGS --json`` started now; ``send`` its input, ``finish`` for the
    answer (the same errors as ``Target.run_agent``)."""

    def __init__(self, target: Target, args: list[str], timeout: float):
        self.target, self.timeout = target, timeout
        self.closed = False  # the command stopped reading (its answer says why)
        self._ssh = None  # the OpenSSH client it runs through, if any
        self._kept = None  # the kept connection it runs through, if any (laptop/kept)
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._answered = 0  # answers ``answer`` returned: the next one is the one after
        self._arrived = threading.Condition()  # stdout grew, or a reader ended
        command = agent_command(target, args)
        if isinstance(target, SSHTarget):
            kept = target.kept.request([*args, "--json"]) if target.kept is not None else None
            if kept is not None:
                self._open_kept(kept)
            elif target.openssh is None or not self._open_openssh(command):
                self._open_channel(command)
        else:
            self._proc = subprocess.Popen(["bash", "-c", command], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            grow_pipe(self._proc.stdin.fileno())
            self._chan = None
            self._readers = [_reader(self._proc.stdout.read1, self._out, self._arrived),
                             _reader(self._proc.stderr.read1, self._err, self._arrived)]

    def _open_openssh(self, command: str) -> bool:
        """The command through the ``ssh`` client (``laptop/openssh``), once it logged in;
        False when it could not (paramiko then connects and says why, as always)."""
        client = self.target.openssh
        try:
            proc = client.start(command)
        except OSError as exc:
            log.info("could not start ssh (%s); using paramiko", exc)
            return False
        self._proc, self._chan, self._ssh = proc, None, client
        grow_pipe(proc.stdin.fileno())  # a deploy's bytes: see common/files.grow_pipe
        self._readers = [_reader(proc.stdout.read, self._out, self._arrived),
                         _reader(proc.stderr.read, self._err, self._arrived)]
        deadline = time.monotonic() + 2 * client.connect_timeout + 5
        with self._arrived:
            while CONNECTED not in b"".join(self._err):
                if not all(r.is_alive() for r in self._readers) or \
                        time.monotonic() > deadline:
                    break
                self._arrived.wait(0.5)
            else:
                return True
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        said = b"".join(self._err).decode("utf-8", "replace").strip().splitlines()[-1:]
        log.info("ssh to %s did not log in (%s); using paramiko", client.where,
                 said[0] if said else f"exit {proc.returncode}")
        self._out, self._err, self._ssh = [], [], None
        return False

    def _open_kept(self, kept) -> None:
        """The command through the keeper (already started on the server)."""
        from remoteops.common.kept_wire import OUT

        self._proc, self._chan, self._kept = None, None, kept

        def drain() -> None:
            try:
                for kind, payload in kept.frames_in():
                    with self._arrived:
                        (self._out if kind == OUT else self._err).append(payload)
                        self._arrived.notify_all()
            finally:
                with self._arrived:
                    self._arrived.notify_all()

        self._readers = [threading.Thread(target=drain, daemon=True)]
        self._readers[0].start()

    def _open_channel(self, command: str) -> None:
        import paramiko

        conn = self.target.connection
        try:
            self._chan = conn.transport.open_session(timeout=self.timeout)
            self._chan.exec_command(command)
        except (socket.error, EOFError, paramiko.SSHException) as exc:
            raise self.target._lost(conn, str(exc)) from None
        self._proc = None
        self._readers = [_reader(self._chan.recv, self._out, self._arrived),
                         _reader(self._chan.recv_stderr, self._err, self._arrived)]

    def send(self, data: bytes) -> None:
        if self.closed or not data:
            return
        try:
            if self._kept is not None:
                self._kept.send(data)
            elif self._chan is not None:
                self._chan.sendall(data)
            else:
                self._proc.stdin.write(data)
                self._proc.stdin.flush()  # the agent may answer before the input ends
        except (OSError, EOFError, ValueError):
            self.closed = True

    def send_file(self, fh, start: int, length: int, prefix: bytes = b"") -> None:
        """``prefix`` and ``length`` bytes of the open file ``fh`` from ``start``: through a
        kept connection the kernel moves them (``sendfile``), else they are read and sent."""
        if self.closed:
            return
        if self._kept is not None:
            try:
                self._kept.send_file(fh, start, length, prefix)
            except (OSError, EOFError, ValueError):
                self.closed = True
            return
        self.send(prefix + os.pread(fh.fileno(), length, start))

    def input_fd(self) -> int | None:
        """The pipe to the ``ssh`` client's stdin, for bytes moved there by the kernel (the
        keeper's ``splice``); None: no such pipe (paramiko, the keeper, closed)."""
        if self.closed or self._proc is None or self._proc.stdin is None \
                or self._proc.stdin.closed:
            return None
        return self._proc.stdin.fileno()

    def cancel(self) -> None:
        """Close the input without the go-ahead and stop waiting (nothing is applied)."""
        self.closed = True
        if self._kept is not None:
            self._kept.close()
        elif self._chan is not None:
            self._chan.close()
        elif self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def answer(self) -> Any:
        """The next answer the command prints while it still runs (a plan), once it came;
        when the command ends without one, its error (as ``finish``)."""
        with self._arrived:
            while True:
                out = b"".join(self._out)
                start, end = -1, 0
                for _ in range(self._answered + 1):
                    start = out.find(BEGIN.encode(), end)
                    end = out.find(END.encode(), start) if start >= 0 else -1
                    if end < 0:
                        break
                if end >= 0:
                    self._answered += 1
                    return json.loads(out[start + len(BEGIN):end].decode("utf-8"))
                if not all(r.is_alive() for r in self._readers):
                    break
                self._arrived.wait(1.0)
        return self.finish()

    def finish(self) -> Any:
        """Close the input, wait for the command and return its JSON answer."""
        self._close_input()
        deadline = time.monotonic() + self.timeout
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        if any(r.is_alive() for r in self._readers):
            self.cancel()
            raise timed_out(self.timeout, self.target.name)
        code = self._exit_code()
        stderr = self._stderr()
        if code == 255 and self._ssh is not None:  # ssh's own failure: the connection broke
            said = [l for l in stderr.strip().splitlines() if not l.startswith("error: ")]
            raise ConnectError(f"connection lost to {self.target.name} "
                               f"({said[-1] if said else 'the server closed it'}); check the "
                               "network and run the command again.")
        return self.target.agent_answer(b"".join(self._out).decode("utf-8", "replace"),
                                        stderr, code)

    def read_out(self) -> bytes | None:
        """What the command printed since the last call, once there is some (None: its
        output ended)."""
        with self._arrived:
            while not self._out:
                if not all(r.is_alive() for r in self._readers):
                    return None
                self._arrived.wait(1.0)
            data = b"".join(self._out)
            self._out.clear()
            return data

    def _stderr(self) -> str:
        """What the command printed on stderr (without ``ssh``'s logged-in marker)."""
        return b"".join(self._err).replace(CONNECTED + b"\n", b"", 1).decode("utf-8",
                                                                            "replace")

    def error_text(self) -> str:
        """The last line the command printed on stderr, if any."""
        lines = self._stderr().strip().splitlines()
        return lines[-1] if lines else ""

    def _close_input(self) -> None:
        try:
            if self._kept is not None:
                self._kept.close_input()
            elif self._chan is not None:
                self._chan.shutdown_write()
            else:
                self._proc.stdin.close()
        except (OSError, EOFError):
            pass

    def _exit_code(self) -> int:
        if self._kept is not None:
            self._kept.close()
            if self._kept.code is None:
                raise kept_lost(self.target.name)
            return self._kept.code
        if self._proc is not None:
            return self._proc.wait()
        code = self._chan.recv_exit_status()
        if code == -1:
            from remoteops.laptop.ssh import lost_reason

            conn = self.target._conn
            if lost_reason(conn):
                raise self.target._lost(conn)
        self._chan.close()
        return code


def _reader(read, sink: list[bytes], arrived: threading.Condition) -> threading.Thread:
    def drain() -> None:
        try:
            while True:
                try:
                    chunk = read(65536)
                except (OSError, EOFError, ValueError):
                    return
                if not chunk:
                    return
                with arrived:
                    sink.append(chunk)
                    arrived.notify_all()
        finally:
            with arrived:
                arrived.notify_all()

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    return thread


__all__ = ["AgentStream", "can_stream", "not_streamable", "STDIN_EVENT"]
