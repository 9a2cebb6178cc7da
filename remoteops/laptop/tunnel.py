"""A local port forwarded over the SSH connection we already have (like ``ssh -L``).

Each connection to ``127.0.0.1:<local port>`` becomes a ``direct-tcpip`` channel of the
target's paramiko transport to ``127.0.0.1:<remote port>`` on the server: nothing listens on
the server but the chat server itself, on its loopback address. The transport is asked for
per connection, so a connection that dropped is reopened by the next request.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from typing import Any, Callable

from remoteops.common.errors import RemoteOpsError


class Forward:
    """Listen on ``127.0.0.1:local_port`` (0: any free port) and forward to the server."""

    def __init__(self, transport: Callable[[], Any], remote_port: int, local_port: int = 0,
                 remote_host: str = "127.0.0.1", on_error: Callable[[str], None] | None = None):
        self._transport = transport
        self._on_error = on_error
        # paramiko logs a refused channel at ERROR level; we report it ourselves, in one line
        logging.getLogger("paramiko.transport").addHandler(logging.NullHandler())
        self.remote = (remote_host, int(remote_port))
        self.errors: list[str] = []
        self._closed = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind(("127.0.0.1", int(local_port)))
        except OSError:
            self._sock.close()
            raise RemoteOpsError(f"local port {local_port} is in use on this machine; choose "
                                 "another with --local-port.") from None
        self._sock.listen(32)
        self._sock.settimeout(0.3)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True, name="forward")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, addr = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                chan = self._transport().open_channel("direct-tcpip", self.remote, addr,
                                                      timeout=15)
            except Exception as exc:  # noqa: BLE001 - refused by sshd, connection lost...
                self.errors.append(_why(exc))  # before the close the client will see
                conn.close()
                if self._on_error is not None:
                    self._on_error(self.errors[-1])
                continue
            threading.Thread(target=_pipe, args=(conn, chan, self._closed), daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._thread.join(2)

    def __enter__(self) -> "Forward":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _why(exc: Exception) -> str:
    text = getattr(exc, "text", None) or str(exc) or type(exc).__name__
    if "prohibited" in text.lower() or "refused" in text.lower():
        return (f"the server's sshd refused to forward the port ({text}): allow it with "
                "AllowTcpForwarding local (or yes) in its sshd_config")
    return f"could not open a channel to the server ({text})"


def _pipe(conn: socket.socket, chan: Any, closed: threading.Event) -> None:
    """Copy bytes both ways until either side closes."""
    try:
        while not closed.is_set():
            ready, _, _ = select.select([conn, chan], [], [], 0.5)
            if conn in ready:
                data = conn.recv(65536)
                if not data:
                    break
                chan.sendall(data)
            if chan in ready:
                data = chan.recv(65536)
                if not data:
                    break
                conn.sendall(data)
    except OSError:
        pass
    finally:
        chan.close()
        conn.close()


__all__ = ["Forward"]
