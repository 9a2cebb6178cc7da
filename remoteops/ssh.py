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
    import paramiko
    from paramiko.ssh_exception import NoValidConnectionsError

    attempt = 0
    while True:
        conn = factory()
        where = f"{conn.user}@{conn.host}:{conn.port}"
        try:
            conn.open()
            if keepalive and conn.transport is not None:
                conn.transport.set_keepalive(keepalive)
            return conn
        except HostKeyError:
            conn.close()
            raise
        except paramiko.BadHostKeyException as exc:
            conn.close()
            raise changed_key_error(exc, [Path(p) for p in _known_files(conn)]) from None
        except paramiko.AuthenticationException:
            conn.close()
            raise ConnectError(
                f"{where} refused our SSH key for user '{conn.user}': add your public key to "
                f"~/.ssh/authorized_keys on the server, or load the right key with ssh-add "
                f"(or set IdentityFile / hosts.<name>.identity_file).") from None
        except socket.gaierror:
            conn.close()
            raise ConnectError(f"cannot resolve host name '{conn.host}' (from '{label}'): check "
                               "the spelling, [hosts] in remoteops.toml, or your ~/.ssh/config "
                               "alias.") from None
        except (NoValidConnectionsError, *_RETRYABLE, paramiko.SSHException, EOFError) as exc:
            conn.close()
            attempt += 1
            if attempt > retries:
                raise ConnectError(_network_message(exc, where)) from None
            delay = backoff * (2 ** (attempt - 1))
            log.info("connecting to %s failed (%s); retrying in %.1fs", where, exc, delay)
            time.sleep(delay)


def _known_files(conn: Any) -> list[str]:
    policy = conn.client._policy  # our VerifyHostKeyPolicy
    return [str(getattr(policy, "record_file", "known_hosts")), "~/.ssh/known_hosts"]


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
