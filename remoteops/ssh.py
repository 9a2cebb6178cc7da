"""Opening Fabric connections: ssh_config, keys, host-key policy, retries, clear errors."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable

from remoteops.config import Settings, resolve_secret
from remoteops.errors import ConnectError, HostKeyError
from remoteops.hostkeys import changed_key_error, secure_client

log = logging.getLogger(__name__)

_HOSTPORT = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:@\s]+)(?::(?P<port>\d+))?$")


def parse_host(spec: str) -> tuple[str | None, str, int | None]:
    """Split ``[user@]host[:port]``; raise a clear error for anything else."""
    m = _HOSTPORT.match(spec)
    if not m:
        raise ConnectError(f"cannot read host '{spec}'; write it as [user@]host[:port], a name "
                           "from [hosts] in remoteops.toml, or an ~/.ssh/config alias.")
    port = int(m.group("port")) if m.group("port") else None
    return m.group("user"), m.group("host").strip("[]"), port


def connection_factory(settings: Settings, spec: str, entry: dict,
                       trust_host: bool) -> tuple[Callable[[], Any], str]:
    """A function that builds a not-yet-open verified Connection, and a label for messages."""
    import fabric

    ssh = settings["ssh"]
    user_cfg = Path(os.path.expanduser(ssh["config_file"]))
    known = [Path(os.path.expanduser(ssh["known_hosts"]))]
    record = Path(ssh["project_known_hosts"]).expanduser()
    if not record.is_absolute():
        record = settings.project_dir / record
    known.append(record)

    if entry:
        host = str(entry.get("hostname") or entry.get("host") or spec)
        user, port = entry.get("user"), entry.get("port")
        user_h, host, port_h = parse_host(host)
        user, port = user or user_h, port or port_h
    else:
        user, host, port = parse_host(spec)

    overrides: dict[str, Any] = {"load_ssh_configs": True}
    config = fabric.Config(overrides=overrides, user_ssh_path=str(user_cfg),
                           system_ssh_path="/etc/ssh/ssh_config")
    connect_kwargs: dict[str, Any] = {"allow_agent": True, "look_for_keys": True,
                                      "banner_timeout": float(ssh["connect_timeout"]),
                                      "auth_timeout": float(ssh["connect_timeout"])}
    if entry.get("identity_file"):
        connect_kwargs["key_filename"] = [os.path.expanduser(str(entry["identity_file"]))]
    if entry.get("passphrase") is not None:
        connect_kwargs["passphrase"] = resolve_secret(entry["passphrase"])

    class VerifiedConnection(fabric.Connection):
        """A Fabric Connection (and every ProxyJump hop) that verifies host keys."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._secure_chain(self)

        @staticmethod
        def _secure_chain(cxn: Any) -> None:
            while isinstance(cxn, fabric.Connection):
                secure_client(cxn.client, known, record, trust_host)
                cxn = cxn.gateway

    def factory() -> Any:
        kwargs: dict[str, Any] = {"config": config.clone(), "connect_timeout":
                                  float(ssh["connect_timeout"]), "connect_kwargs": connect_kwargs}
        if user:
            kwargs["user"] = str(user)
        if port:
            kwargs["port"] = int(port)
        if entry.get("proxy_jump"):
            kwargs["gateway"] = fabric.Connection(str(entry["proxy_jump"]), config=config.clone())
        return VerifiedConnection(host, **kwargs)

    label = spec
    return factory, label


_RETRYABLE = (ConnectionRefusedError, TimeoutError, socket.timeout, ConnectionResetError)


def open_connection(factory: Callable[[], Any], label: str, retries: int, backoff: float,
                    keepalive: int) -> Any:
    """Open a connection with retry and backoff on network errors; map errors to one line."""
    attempt = 0
    while True:
        conn = factory()
        where = f"{conn.user}@{conn.host}:{conn.port}"
        try:
            conn.open()
            if keepalive and conn.transport is not None:
                conn.transport.set_keepalive(keepalive)
            return conn
        except Exception as exc:  # classified below; anything unknown is re-raised
            conn.close()
            error, retryable = _classify(exc, conn, where, label)
            if error is None:
                raise
            attempt += 1
            if not retryable or attempt > retries:
                raise error from None
            delay = backoff * (2 ** (attempt - 1))
            log.info("connecting to %s failed (%s); retrying in %.1fs", where, exc, delay)
            time.sleep(delay)


def _classify(exc: Exception, conn: Any, where: str, label: str
              ) -> tuple[ConnectError | None, bool]:
    """The one-line error for a failed connect, and whether trying again may help."""
    import paramiko
    from paramiko.ssh_exception import NoValidConnectionsError

    if isinstance(exc, HostKeyError):
        return exc, False
    if isinstance(exc, paramiko.BadHostKeyException):
        return changed_key_error(exc, where, _known_files(conn)), False
    if isinstance(exc, paramiko.AuthenticationException) or (
            isinstance(exc, paramiko.SSHException) and "authentication" in str(exc).lower()):
        return ConnectError(
            f"{where} refused our SSH key for user '{conn.user}': add your public key to "
            f"~/.ssh/authorized_keys on the server, or load the right key with ssh-add "
            f"(or set IdentityFile / hosts.<name>.identity_file)."), False
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"cannot resolve host name '{conn.host}' (from '{label}'): check the "
                            "spelling, [hosts] in remoteops.toml, or your ~/.ssh/config alias."
                            ), False
    if isinstance(exc, (NoValidConnectionsError, paramiko.SSHException, EOFError, *_RETRYABLE)):
        return ConnectError(_network_message(exc, where)), True
    return None, False


def _known_files(conn: Any) -> list[Path]:
    policy = conn.client._policy  # our VerifyHostKeyPolicy
    record = getattr(policy, "record_file", None)
    return [p for p in (Path(os.path.expanduser("~/.ssh/known_hosts")), record) if p]


def _network_message(exc: BaseException, where: str) -> str:
    text = str(exc)
    if isinstance(exc, (socket.timeout, TimeoutError)) or "timed out" in text:
        return (f"timed out connecting to {where}: check the host and port, and that no "
                "firewall blocks it.")
    if "banner" in text.lower() or "protocol" in text.lower():
        return (f"{where} did not answer as an SSH server ({text}): check the port "
                "(--host user@host:PORT).")
    if "refused" in text.lower() or "Unable to connect" in text:
        return (f"cannot connect to {where} (connection refused): check the port "
                "(--host user@host:PORT) and that sshd runs there.")
    return f"cannot connect to {where} ({text}): check the host, port and network."


_SFTP_MARK = b"@@REMOTEOPS-SFTP-READY@@"
_SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                 "/usr/lib/ssh/sftp-server", "/usr/libexec/sftp-server")


def open_sftp(conn: Any, label: str) -> Any:
    """An SFTP client, even when the login shell prints a banner.

    An external ``sftp-server`` subsystem starts through the user's shell, so a
    ``.bashrc`` that echoes corrupts the protocol ("Garbage packet"). Then we
    start sftp-server ourselves behind a marker and skip whatever came first.
    """
    import paramiko

    try:
        return conn.client.open_sftp()
    except (paramiko.SFTPError, EOFError, paramiko.SSHException) as exc:
        log.info("sftp subsystem on %s failed (%s); starting sftp-server behind a marker",
                 label, exc)
    chan = conn.transport.open_session()
    finder = " ".join(_SFTP_SERVERS)
    chan.exec_command(f"printf '%s' '{_SFTP_MARK.decode()}'; for p in {finder}; do "
                      f'[ -x "$p" ] && exec "$p"; done; exit 127')
    seen = b""
    deadline = time.monotonic() + 30
    while _SFTP_MARK not in seen:
        if time.monotonic() > deadline or chan.exit_status_ready() and not chan.recv_ready():
            chan.close()
            raise ConnectError(f"cannot start SFTP on {label}: its login shell prints text for "
                               "non-interactive sessions and no sftp-server was found; put "
                               "'[[ $- == *i* ]] || return' at the top of ~/.bashrc there.")
        if chan.recv_ready():
            seen += chan.recv(65536)
        else:
            time.sleep(0.01)
    return paramiko.SFTPClient(chan)
