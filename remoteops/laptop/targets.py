"""Targets the laptop opens: ``open_target`` for ``--host``, and ``SSHTarget`` (Fabric).

The interface (``Target``) and ``LocalTarget`` live in ``remoteops.common.target``; the wire
(markers, payload on stdin) in ``remoteops.common.wire``. Both are re-exported here.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from remoteops.common.config import Settings
from remoteops.common.secret_rules import resolve_secret
from remoteops.common.errors import ConfigError, ConnectError, timed_out
from remoteops.common.target import LocalTarget, Target

log = logging.getLogger(__name__)
# agent commands that may use a kept connection: those that read, and those that change
# files or signal processes whatever the environment (a rollback is journaled as a deploy
# is; a request cut midway runs to its end). Not the ones that start processes
# (pipeline-start, serve-start, fetch-model): the resident's environment is the one its
# login had, and a training run must get the login environment of now.
KEPT_COMMANDS = frozenset({"backups", "checkpoints", "data-status", "deploy-plan",
                           "pipeline-files", "pipeline-live", "pipeline-logs", "pipeline-runs",
                           "pipeline-status", "serve-status", "version", "rollback",
                           "pipeline-cancel", "pipeline-mark", "serve-prompts",
                           "serve-report"})


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
        # ``openssh.OpenSSHClient`` for agent streams (the deploy's request), or None: paramiko
        self.openssh = None
        # the one a deploy that sends the whole bundle takes instead of paramiko (``[ssh]
        # client`` left at its default, and ``ssh`` can express the host), or None
        self.bulk_openssh = None
        # ``kept.Kept``: the kept connection requests may go through, or None
        self.kept = None

    def prefer_openssh(self) -> None:
        """For a deploy that sends the whole bundle: its request through ``ssh`` where the
        default allows (``bulk_openssh``). paramiko's per-packet work in Python made a first
        full deploy over a fresh login 2.09-2.15 s instead of 1.55-1.61 s (loopback, 145 MB);
        a small redeploy keeps paramiko, whose login takes two round trips fewer."""
        if self.openssh is None:
            self.openssh = self.bulk_openssh

    @property
    def connection(self):
        if self._conn is not None:
            from remoteops.laptop.ssh import lost_reason

            if lost_reason(self._conn):  # reopen through _connect, so keepalive is set again
                self.close()
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _lost(self, conn, detail: str = "") -> ConnectError:
        from remoteops.laptop.ssh import lost_reason

        reason = lost_reason(conn) or detail or "the server closed it"
        self.close()
        return ConnectError(f"connection lost to {self.name} ({reason}); check the network "
                            "and run the command again.")

    def _connect(self):
        from remoteops.laptop.ssh import open_connection

        return open_connection(self._factory, self.name, self.retries, self.backoff,
                               self.keepalive)

    def run_agent(self, *args: str, timeout: float | None = None):
        """As ``Target.run_agent``; the commands that only read go through the kept
        connection when there is one (``laptop/kept``: no login)."""
        if self.kept is not None and args and args[0] in KEPT_COMMANDS and self.kept.ready():
            got = self.kept.run([*args, "--json"], timeout or self.command_timeout, self.name)
            if got is not None:
                return self.agent_answer(*got)
        return super().run_agent(*args, timeout=timeout)

    def _run(self, command: str, timeout: float, stdin: str | None) -> tuple[str, str, int]:
        # Always our own channel, its input closed after the payload (or at once): a login
        # shell that reads stdin gets EOF instead of waiting out the command timeout (fabric's
        # run never closes it), and invoke's in_stream would feed a payload a byte per 10 ms.
        return self._run_channel(self.connection, command, timeout,
                                 b"" if stdin is None else stdin.encode())

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
            raise timed_out(timeout, self.name)
        code = chan.recv_exit_status()
        if code == -1:
            from remoteops.laptop.ssh import lost_reason

            if lost_reason(conn):
                raise self._lost(conn)
        chan.close()
        return (b"".join(out).decode("utf-8", "replace"),
                b"".join(err).decode("utf-8", "replace"), code)

    @property
    def sftp(self):
        conn = self.connection  # reconnects (keepalive included) after a drop
        if self._sftp is None:
            from remoteops.laptop.ssh import open_sftp

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
        hops = []
        if self._conn is not None:
            from remoteops.laptop.ssh import transports, wait_closed, wake_reader

            hops = transports(self._conn)
        for obj in (self._sftp, self._conn):
            if obj is not None:
                if obj is self._conn:
                    for transport in hops:
                        wake_reader(transport)
                try:
                    obj.close()
                except (OSError, EOFError, Exception):  # noqa: BLE001
                    pass
        for transport in hops:
            wait_closed(transport)
        self._sftp = self._conn = None
        if self.kept is not None and self.kept.wanted:  # none was there: keep one for next time
            self.kept.wanted = False
            self.kept.spawn()

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
    if "," in spec or spec.startswith("@"):  # laptop/host_group: only some tasks take several
        raise ConfigError(f"--host {spec} names several hosts; this command takes one (several "
                          "work with precheck, deploy-bundle, rollback, backups, status, runs, "
                          "cancel, collect and remote-train).")
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
    from remoteops.laptop.openssh import client_for
    from remoteops.laptop.ssh import connection_factory

    factory, label, endpoint = connection_factory(settings, spec, entry, trust_host)
    passphrase = entry.get("passphrase")
    if passphrase is not None:
        resolve_secret(passphrase)  # fail early, with the variable's name, when it is unset
    target = SSHTarget(label, root, python, factory,
                       retries=int(settings["ssh.connect_retries"]),
                       backoff=float(settings["ssh.retry_backoff"]),
                       keepalive=int(settings["ssh.keepalive"]), command_timeout=timeout)
    target.openssh = client_for(endpoint, str(settings["ssh.client"]))
    if settings.source("ssh.client") == "default":
        target.bulk_openssh = client_for(endpoint, "auto")
    from remoteops.laptop.kept import kept_for

    target.kept = kept_for(settings, spec, entry, endpoint, python)
    return target


__all__ = ["SSHTarget", "open_target"]
