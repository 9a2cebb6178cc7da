"""Where the server side lives: ``SSHTarget`` (Fabric) or ``LocalTarget`` (this machine).

Both expose one small interface: ``run`` a shell command, ``run_python`` a
script whose payload travels on stdin (never in ``ps``) and whose JSON answer
survives login-shell banners, ``put``/``get`` files
(SFTP, never the shell), and ``read_bytes``/``write_bytes`` (atomic). The base
class owns the cross-cutting work (timing, errors); subclasses fill in the
``_methods``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remoteops.common.files import write_atomic_bytes
from remoteops.config import Settings, resolve_secret
from remoteops.errors import ConnectError, RemoteCommandError, RemoteOpsError

log = logging.getLogger(__name__)

BEGIN = "@@REMOTEOPS-BEGIN-7f3a@@"
END = "@@REMOTEOPS-END-7f3a@@"

PAYLOAD_MARK = "@@REMOTEOPS-PAYLOAD-7f3a@@"
# Reads the payload (settings and all) from stdin, never from the command line, where every
# user of the server sees it in ``ps``; prints the answer only between markers.
_BOOTSTRAP = (
    "import base64,json,sys,zlib;"
    "r=sys.stdin.buffer.read();i=r.rfind(b'{mark}');"
    "i<0 and sys.exit('remoteops: the payload did not arrive on stdin; something in the "
    "login shell (~/.bashrc) reads stdin: guard it with [[ $- == *i* ]]');"
    "d=json.loads(zlib.decompress(base64.b64decode(r[i+{skip}:])).decode());"
    "g={{'payload':d['payload'],'__name__':'__remoteops__'}};"
    "exec(compile(d['source'],'<remoteops>','exec'),g);"
    "sys.stdout.write('\\n{begin}\\n'+json.dumps(g.get('result'))+'\\n{end}\\n')"
)


class AgentMissing(RemoteCommandError):
    """The target's Python has no remoteops installed."""


@dataclass
class Result:
    stdout: str
    stderr: str
    exited: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exited == 0


def parse_marked(stdout: str) -> Any:
    """The JSON between the markers, ignoring whatever a login shell printed around it."""
    start = stdout.rfind(BEGIN)
    end = stdout.rfind(END)
    if start < 0 or end < start:
        raise RemoteCommandError("the target's Python printed no answer; run with -v to see "
                                 "its output.")
    return json.loads(stdout[start + len(BEGIN):end].strip())


def shell_path(path: str) -> str:
    """Quote a path for the shell, keeping a leading ``~/`` expandable."""
    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


class Target:
    """The interface every target offers. Subclasses implement the ``_methods``."""

    kind = "target"

    def __init__(self, name: str, project_root: str, python: str = "python3",
                 command_timeout: float = 300.0):
        self.name = name
        self.project_root = project_root
        self.python = python
        self.command_timeout = command_timeout

    # -- public API: cross-cutting work here, specifics in _methods -----------
    def run(self, command: str, *, timeout: float | None = None, check: bool = True,
            stdin: str | None = None) -> Result:
        """Run ``command`` in the login shell; ``stdin`` (if given) is its whole input."""
        started = time.monotonic()
        stdout, stderr, code = self._run(command, timeout or self.command_timeout, stdin)
        result = Result(stdout, stderr, code, time.monotonic() - started)
        log.debug("%s: %r exited %s in %.2fs", self.name, command[:120], code, result.seconds)
        if check and code != 0:
            tail = (stderr.strip() or stdout.strip()).splitlines()[-1:] or ["no output"]
            raise RemoteCommandError(f"command failed on {self.name} (exit {code}): {tail[0]}")
        return result

    def run_python(self, source: str, payload: Any = None, *, timeout: float | None = None) -> Any:
        """Run ``source`` with the target's Python in one round trip; return its ``result``."""
        blob = base64.b64encode(zlib.compress(json.dumps(
            {"source": source, "payload": payload}).encode(), 9)).decode()
        script = _BOOTSTRAP.format(mark=PAYLOAD_MARK, skip=len(PAYLOAD_MARK), begin=BEGIN,
                                   end=END)
        command = f"{shell_path(self.python)} -c {shlex.quote(script)}"
        result = self.run(command, timeout=timeout, check=False,
                          stdin=f"{PAYLOAD_MARK}{blob}\n")
        if result.exited == 127 or "No such file" in result.stderr and result.exited != 0:
            raise RemoteCommandError(
                f"'{self.python}' was not found on {self.name}; set remote_python (or "
                f"hosts.<name>.remote_python) to the server's Python.")
        if result.exited != 0:
            tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
            raise RemoteCommandError(f"Python on {self.name} failed (exit {result.exited}): "
                                     f"{tail[0]}")
        return parse_marked(result.stdout)

    def put(self, local: str | os.PathLike, remote: str) -> None:
        self._put(Path(local), remote)

    def get(self, remote: str, local: str | os.PathLike) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self._get(remote, Path(local))

    def read_bytes(self, path: str) -> bytes:
        return self._read_bytes(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write atomically: a temporary name in the same folder, then rename."""
        self._write_bytes(path, data)

    def size(self, path: str) -> int | None:
        """Size of a file on the target, or None when it does not exist."""
        return self._size(path)

    def open_append(self, path: str):
        """A binary file object appending to ``path`` (created with its folders if missing)."""
        return self._open_append(path)

    def rename(self, src: str, dst: str) -> None:
        self._rename(src, dst)

    def open_read(self, path: str, offset: int = 0):
        """A binary file object reading ``path`` from ``offset``."""
        return self._open_read(path, offset)

    def remove(self, path: str) -> None:
        self._remove(path)

    def run_agent(self, *args: str, timeout: float | None = None) -> Any:
        """Run ``remoteops-agent ARGS --json`` with the target's Python; return its JSON."""
        command = " ".join([shell_path(self.python), "-m", "remoteops.agent",
                            *(shell_path(a) for a in args), "--json"])
        result = self.run(command, timeout=timeout, check=False)
        if result.exited != 0:
            errors = [l[len("error: "):] for l in result.stderr.splitlines()
                      if l.startswith("error: ")]
            if errors:
                raise RemoteCommandError(errors[-1])
            if "No module named remoteops" in result.stderr or \
                    "No module named 'remoteops'" in result.stderr:
                raise AgentMissing(f"remoteops is not installed for {self.python} on {self.name}")
            tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
            raise RemoteCommandError(f"the agent on {self.name} failed (exit {result.exited}): "
                                     f"{tail[0]}")
        return parse_marked(result.stdout)

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return self.name

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- to implement ---------------------------------------------------------
    def _run(self, command: str, timeout: float, stdin: str | None) -> tuple[str, str, int]:
        raise NotImplementedError

    def _put(self, local: Path, remote: str) -> None:
        raise NotImplementedError

    def _get(self, remote: str, local: Path) -> None:
        raise NotImplementedError

    def _read_bytes(self, path: str) -> bytes:
        raise NotImplementedError

    def _write_bytes(self, path: str, data: bytes) -> None:
        raise NotImplementedError

    def _size(self, path: str) -> int | None:
        raise NotImplementedError

    def _open_append(self, path: str):
        raise NotImplementedError

    def _rename(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def _remove(self, path: str) -> None:
        raise NotImplementedError

    def _open_read(self, path: str, offset: int):
        raise NotImplementedError


class LocalTarget(Target):
    """The server side on this machine: same interface, no SSH."""

    kind = "local"

    def _run(self, command: str, timeout: float, stdin: str | None) -> tuple[str, str, int]:
        feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
        try:
            proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                  timeout=timeout, **feed)
        except subprocess.TimeoutExpired:
            raise RemoteCommandError(f"command timed out after {timeout:.0f}s on {self.name}; "
                                     "raise ssh.command_timeout if it needs longer.") from None
        return proc.stdout, proc.stderr, proc.returncode

    def _path(self, path: str) -> Path:
        return Path(os.path.expanduser(path))

    def _put(self, local: Path, remote: str) -> None:
        dest = self._path(remote)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dest)

    def _get(self, remote: str, local: Path) -> None:
        shutil.copyfile(self._path(remote), local)

    def _read_bytes(self, path: str) -> bytes:
        return self._path(path).read_bytes()

    def _write_bytes(self, path: str, data: bytes) -> None:
        write_atomic_bytes(self._path(path), data)

    def _size(self, path: str) -> int | None:
        try:
            return self._path(path).stat().st_size
        except FileNotFoundError:
            return None

    def _open_append(self, path: str):
        dest = self._path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return open(dest, "ab")

    def _rename(self, src: str, dst: str) -> None:
        os.replace(self._path(src), self._path(dst))

    def _remove(self, path: str) -> None:
        self._path(path).unlink(missing_ok=True)

    def _open_read(self, path: str, offset: int):
        fh = open(self._path(path), "rb")
        fh.seek(offset)
        return fh


class SSHTarget(Target):
    """The server side over SSH (Fabric ``Connection``, opened lazily, host keys verified)."""

    kind = "ssh"

    def __init__(self, name: str, project_root: str, python: str, connection_factory,
                 retries: int = 2, backoff: float = 1.0, keepalive: int = 15,
                 command_timeout: float = 300.0):
        super().__init__(name, project_root, python, command_timeout)
        self._factory = connection_factory
        self._conn = None
        self._sftp = None
        self._home: str | None = None
        self.retries = retries
        self.backoff = backoff
        self.keepalive = keepalive

    @property
    def connection(self):
        if self._conn is not None:
            from remoteops.ssh import lost_reason

            if lost_reason(self._conn):  # reopen through _connect, so keepalive is set again
                self.close()
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _lost(self, conn, detail: str = "") -> ConnectError:
        from remoteops.ssh import lost_reason

        reason = lost_reason(conn) or detail or "the server closed it"
        self.close()
        return ConnectError(f"connection lost to {self.name} ({reason}); check the network "
                            "and run the command again.")

    def _connect(self):
        from remoteops.ssh import open_connection

        return open_connection(self._factory, self.name, self.retries, self.backoff,
                               self.keepalive)

    def _run(self, command: str, timeout: float, stdin: str | None) -> tuple[str, str, int]:
        from invoke.exceptions import CommandTimedOut

        import paramiko

        conn = self.connection
        if stdin is not None:  # invoke feeds in_stream one byte per 10 ms: use the channel
            return self._run_channel(conn, command, timeout, stdin.encode())
        try:
            res = conn.run(command, hide=True, warn=True, timeout=timeout, in_stream=False)
        except CommandTimedOut:
            raise RemoteCommandError(f"command timed out after {timeout:.0f}s on {self.name}; "
                                     "raise ssh.command_timeout if it needs longer.") from None
        except (socket.error, EOFError, paramiko.SSHException) as exc:
            raise self._lost(conn, str(exc)) from None
        if res.exited == -1:  # no exit status: killed by a signal, or the transport died
            from remoteops.ssh import lost_reason

            if lost_reason(conn):
                raise self._lost(conn)
        return res.stdout, res.stderr, res.exited

    def _run_channel(self, conn, command: str, timeout: float,
                     data: bytes) -> tuple[str, str, int]:
        import paramiko

        try:
            chan = conn.transport.open_session(timeout=timeout)
            chan.exec_command(command)
        except (socket.error, EOFError, paramiko.SSHException) as exc:
            raise self._lost(conn, str(exc)) from None
        out: list[bytes] = []
        err: list[bytes] = []
        readers = [threading.Thread(target=_drain, args=(read, sink), daemon=True)
                   for read, sink in ((chan.recv, out), (chan.recv_stderr, err))]
        for reader in readers:
            reader.start()
        try:
            chan.sendall(data)
            chan.shutdown_write()
        except (socket.error, EOFError):
            pass  # the command ended without reading its input; its output says why
        deadline = time.monotonic() + timeout
        for reader in readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        if any(r.is_alive() for r in readers):
            chan.close()
            raise RemoteCommandError(f"command timed out after {timeout:.0f}s on {self.name}; "
                                     "raise ssh.command_timeout if it needs longer.")
        code = chan.recv_exit_status()
        if code == -1:
            from remoteops.ssh import lost_reason

            if lost_reason(conn):
                raise self._lost(conn)
        chan.close()
        return (b"".join(out).decode("utf-8", "replace"),
                b"".join(err).decode("utf-8", "replace"), code)

    @property
    def sftp(self):
        conn = self.connection  # reconnects (keepalive included) after a drop
        if self._sftp is None:
            from remoteops.ssh import open_sftp

            self._sftp = open_sftp(conn, self.name)
        return self._sftp

    def remote_path(self, path: str) -> str:
        """SFTP does not expand ``~``; resolve it against the login's home directory."""
        if path == "~" or path.startswith("~/"):
            if self._home is None:
                self._home = self.sftp.normalize(".")
            return self._home + path[1:]
        return path

    def _mkdirs(self, folder: str) -> None:
        parts = folder.rstrip("/").split("/")
        for i in range(2, len(parts) + 1):
            sub = "/".join(parts[:i])
            try:
                self.sftp.stat(sub)
            except FileNotFoundError:
                self.sftp.mkdir(sub)

    def _put(self, local: Path, remote: str) -> None:
        remote = self.remote_path(remote)
        self._mkdirs(os.path.dirname(remote))
        self.sftp.put(str(local), remote)

    def _get(self, remote: str, local: Path) -> None:
        self.sftp.get(self.remote_path(remote), str(local))

    def _read_bytes(self, path: str) -> bytes:
        with self.sftp.open(self.remote_path(path), "rb") as fh:
            return fh.read()

    def _write_bytes(self, path: str, data: bytes) -> None:
        path = self.remote_path(path)
        folder, base = os.path.split(path)
        self._mkdirs(folder)
        tmp = f"{folder}/.{base}.tmp-{uuid.uuid4().hex[:8]}"
        with self.sftp.open(tmp, "wb") as fh:
            fh.write(data)
        self.sftp.posix_rename(tmp, path)

    def _size(self, path: str) -> int | None:
        try:
            return self.sftp.stat(self.remote_path(path)).st_size
        except FileNotFoundError:
            return None

    def _open_append(self, path: str):
        path = self.remote_path(path)
        self._mkdirs(os.path.dirname(path))
        fh = self.sftp.open(path, "ab")
        fh.set_pipelined(True)
        return fh

    def _rename(self, src: str, dst: str) -> None:
        self.sftp.posix_rename(self.remote_path(src), self.remote_path(dst))

    def _remove(self, path: str) -> None:
        try:
            self.sftp.remove(self.remote_path(path))
        except FileNotFoundError:
            pass

    def _open_read(self, path: str, offset: int):
        fh = self.sftp.open(self.remote_path(path), "rb")
        fh.seek(offset)
        fh.prefetch()
        return fh

    def close(self) -> None:
        # Best effort: after a cut connection closing raises, and must not hide the real error.
        for obj in (self._sftp, self._conn):
            if obj is not None:
                try:
                    obj.close()
                except (OSError, EOFError, Exception):  # noqa: BLE001
                    pass
        self._sftp = self._conn = None

    def describe(self) -> str:
        return self.name


def _drain(read, sink: list[bytes]) -> None:
    while True:
        chunk = read(65536)
        if not chunk:
            return
        sink.append(chunk)


def open_target(settings: Settings, host: str | None = None, trust_host: bool = False) -> Target:
    """The target for ``--host`` (``local``, a [hosts] name, an ssh alias, or user@host:port)."""
    spec = (host or settings["default_host"] or "local").strip()
    entry = dict(settings["hosts"].get(spec, {}))
    python = str(entry.get("remote_python") or settings["remote_python"])
    timeout = float(settings["ssh.command_timeout"])
    if spec == "local" and not entry:
        root = settings["project_root"] or str(settings.project_dir)
        if settings.source("remote_python") == "default":
            python = sys.executable  # the toolkit's own environment, not whatever is on PATH
        return LocalTarget("local", root, python, timeout)
    root = str(entry.get("project_root") or settings["project_root"]
               or f"~/{settings.project_name}")
    from remoteops.ssh import connection_factory

    factory, label = connection_factory(settings, spec, entry, trust_host)
    passphrase = entry.get("passphrase")
    if passphrase is not None:
        resolve_secret(passphrase)  # fail early, with the variable's name, when it is unset
    return SSHTarget(label, root, python, factory,
                     retries=int(settings["ssh.connect_retries"]),
                     backoff=float(settings["ssh.retry_backoff"]),
                     keepalive=int(settings["ssh.keepalive"]), command_timeout=timeout)


__all__ = ["Target", "LocalTarget", "SSHTarget", "Result", "open_target", "parse_marked",
           "shell_path", "RemoteOpsError"]
