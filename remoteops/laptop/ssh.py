"""Opening Fabric connections: ssh_config, keys, host-key policy, retries, clear errors."""

from __future__ import annotations

import logging
import os
import re
import shlex
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from remoteops.common.config import Settings
from remoteops.common.secret_rules import resolve_secret
from remoteops.common.errors import ConnectError, HostKeyError

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
                       trust_host: bool) -> tuple[Callable[[], Any], str, Any]:
    """A function that builds a not-yet-open verified Connection, a label for messages, and
    the ``openssh.Endpoint`` it connects to (for the OpenSSH client of agent streams).

    Where to connect comes from ``remoteops.laptop.ssh_config`` (OpenSSH's rules); Fabric's own
    ssh_config handling is switched off, since it walks a ProxyJump chain backwards and
    ignores Include and the command-line user in Match. fabric and paramiko are imported
    only when the factory is first called: a deploy over ``ssh`` never loads them.
    """
    from remoteops.laptop.openssh import Endpoint
    from remoteops.laptop.ssh_config import SYSTEM_CONFIG, resolve

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
    jump = str(entry["proxy_jump"]) if entry.get("proxy_jump") else None  # like ssh -J
    resolved = resolve(host, config_files=[(str(user_cfg), True), (SYSTEM_CONFIG, False)],
                       user=str(user) if user else None, port=int(port) if port else None,
                       jump=jump)
    extra_keys = [os.path.expanduser(str(entry["identity_file"]))] \
        if entry.get("identity_file") else []  # like ssh -i: before the config's files
    passphrase = resolve_secret(entry["passphrase"]) if entry.get("passphrase") is not None \
        else None
    timeout = float(ssh["connect_timeout"])
    keepalive = float(ssh["keepalive"])
    built: list[Callable[..., Any]] = []

    def factory() -> Any:
        if not built:
            built.append(_fabric_builder(known, record, trust_host, passphrase, timeout,
                                         keepalive))
        return built[0](resolved, extra_keys)

    endpoint = Endpoint(
        spec, resolved.hostname, resolved.port, resolved.user,
        identity_files=list(dict.fromkeys(extra_keys + resolved.identity_files)),
        look_for_keys=not resolved.identities_only, known_hosts=known,
        via_proxy=bool(resolved.via or resolved.proxy_command), trust_host=trust_host,
        passphrase=passphrase is not None, connect_timeout=timeout, keepalive=keepalive)
    return factory, spec, endpoint


def _fabric_builder(known: list[Path], record: Path, trust_host: bool, passphrase: str | None,
                    timeout: float, keepalive: float) -> Callable[..., Any]:
    """``build(hop, keys)``: a verified Fabric Connection to ``hop`` (its hops first)."""
    import fabric
    import paramiko

    from remoteops.laptop.hostkeys import secure_client
    from remoteops.laptop.ssh_config import HostConfig

    config = fabric.Config(overrides={"load_ssh_configs": False},
                           ssh_config=paramiko.SSHConfig())

    class VerifiedConnection(fabric.Connection):
        """A Fabric Connection that verifies host keys, takes a ProxyCommand as written
        (already expanded) and closes the hops it was opened through."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            secure_client(self.client, known, record, trust_host)

        def open(self) -> Any:
            # Fabric re-opens a dropped connection by itself (@opens): keepalive each time
            result = super().open()
            if keepalive and self.transport is not None:
                keep_alive(self.transport, keepalive)
            return result

        def open_gateway(self) -> Any:
            if isinstance(self.gateway, str):  # through the shell, as ssh runs it
                shell = os.environ.get("SHELL") or "/bin/sh"
                return paramiko.ProxyCommand(f"{shlex.quote(shell)} -c "
                                             f"{shlex.quote('exec ' + self.gateway)}")
            return super().open_gateway()

        def close(self) -> None:
            super().close()
            if isinstance(self.gateway, fabric.Connection):
                self.gateway.close()

    def build(hop: HostConfig, keys: list[str]) -> Any:
        files = [f for f in dict.fromkeys(keys + hop.identity_files) if os.path.isfile(f)]
        # IdentitiesOnly: no default ~/.ssh/id_* files; agent keys stay allowed (paramiko tries
        # them after the files), since an encrypted IdentityFile is often loaded in the agent.
        connect_kwargs: dict[str, Any] = {
            "allow_agent": True, "look_for_keys": not hop.identities_only,
            "banner_timeout": timeout, "auth_timeout": timeout}
        if files:
            connect_kwargs["key_filename"] = files
        if passphrase is not None:
            connect_kwargs["passphrase"] = passphrase
        gateway: Any = build(hop.via, []) if hop.via else hop.proxy_command
        return VerifiedConnection(hop.hostname, user=hop.user, port=hop.port,
                                  config=config.clone(), connect_timeout=timeout,
                                  connect_kwargs=connect_kwargs, gateway=gateway or False)

    return build


def transports(conn: Any) -> list[Any]:
    """The open SSH transports of a connection and of every hop it goes through."""
    found = []
    while conn is not None and not isinstance(conn, (str, bool)):
        if getattr(conn, "transport", None) is not None:
            found.append(conn.transport)
        conn = getattr(conn, "gateway", None)
    return found


KEEPALIVE_MISSES = 2


def keep_alive(transport: Any, interval: float) -> None:
    """OpenSSH's ServerAliveInterval for a paramiko transport: ask the server for an answer
    every ``interval`` seconds and close the transport when none came for
    ``KEEPALIVE_MISSES`` intervals, so a connection a NAT forgot fails in seconds instead of
    hanging until the command timeout. (paramiko's own ``set_keepalive`` only sends, and a
    black hole never makes a send fail.) Idempotent; the reason is kept on the transport as
    ``remoteops_lost``."""
    if not interval or getattr(transport, "remoteops_keepalive", None):
        return
    transport.remoteops_keepalive = interval
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(transport, float(interval), stop),
                               daemon=True, name="remoteops-keepalive")
    transport.remoteops_keepalive_stop = stop, watcher
    watcher.start()


def wake_reader(transport: Any) -> None:
    """Before ``transport.close()``: its reader thread's ``recv`` returns now (a shut-down
    socket) instead of at its next 0.1 s timeout, so ``wait_closed`` need not wait."""
    sock = getattr(transport, "sock", None)
    if isinstance(sock, socket.socket):  # not a ProxyCommand or a jump host's channel
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def wait_closed(transport: Any) -> None:
    """After ``transport.close()``: its reader thread and ``keep_alive``'s have ended (a
    command that forks next, ``Built.finish_detached``, must have no other thread left)."""
    stop, watcher = getattr(transport, "remoteops_keepalive_stop", (None, None))
    if stop is not None:
        stop.set()
        watcher.join(timeout=2)
    if isinstance(transport, threading.Thread) and transport is not threading.current_thread() \
            and transport.ident is not None:
        transport.join(timeout=2)
    sock = getattr(transport, "sock", None)
    if isinstance(sock, socket.socket):
        sock.close()  # a transport that saw the shutdown first never closes it itself


def _watch(transport: Any, interval: float, stop: threading.Event) -> None:
    while transport.is_active() and not stop.is_set():
        answered = threading.Event()

        def ask() -> None:
            try:
                transport.global_request("keepalive@openssh.com", wait=True)
            except Exception:  # noqa: BLE001 - the transport is closing; the loop sees it
                pass
            answered.set()

        asker = threading.Thread(target=ask, daemon=True, name="remoteops-keepalive-ask")
        asker.start()
        if not answered.wait(interval * KEEPALIVE_MISSES) and not stop.is_set():
            transport.remoteops_lost = (f"no answer to SSH keepalives for "
                                        f"{interval * KEEPALIVE_MISSES:g}s")
            log.info("closing the SSH connection: %s", transport.remoteops_lost)
            transport.close()
            return
        asker.join(timeout=1)  # it ends with the answer, or within 0.1 s of a close
        stop.wait(interval)


def lost_reason(conn: Any) -> str | None:
    """Why ``conn`` (or a hop under it) is no longer usable, or None while it is."""
    hops = transports(conn)
    if conn is None or getattr(conn, "transport", None) is None:
        return "not connected"
    for transport in hops:
        if not transport.is_active():
            return getattr(transport, "remoteops_lost", None) or "the server closed it"
    return None


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
            if keepalive:  # every hop too: a hop that dies silently kills the connection
                for transport in transports(conn):
                    keep_alive(transport, keepalive)
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
        from remoteops.laptop.hostkeys import changed_key_error

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
