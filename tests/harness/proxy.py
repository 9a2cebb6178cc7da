"""A TCP proxy in front of sshd that cuts connections for real (RST) after N bytes, or
black-holes them (forwards nothing, closes nothing: a NAT that forgot the flow)."""

from __future__ import annotations

import socket
import struct
import threading


class CutProxy:
    """Forwards 127.0.0.1:<port> to an upstream; ``arm(n)`` cuts the next connection
    after it has carried ``n`` client-to-server bytes; ``blackhole()`` silently drops
    everything the connections open now carry, in both directions, from then on."""

    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1"):
        self.upstream = upstream
        self.listener = socket.create_server((host, 0))
        self.host, self.port = self.listener.getsockname()[:2]
        self.budget: int | None = None
        self.cuts = 0
        self._flows: list[dict] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, n_bytes: int) -> None:
        with self._lock:
            self.budget = n_bytes

    def arm_open(self, n_bytes: int) -> int:
        """Cut each connection open now after it carries ``n_bytes`` more client-to-server
        bytes (a connection held open, e.g. a kept one). Returns how many were armed."""
        with self._lock:
            live = [f for f in self._flows if not f["dead"] and not f.get("closed")]
            for flow in live:
                flow["left"] = n_bytes
            return len(live)

    def blackhole(self) -> int:
        """Forget every open flow: bytes are read and dropped, sockets stay open. Connections
        made later are forwarded normally. Returns how many flows were dropped."""
        with self._lock:
            live = [f for f in self._flows if not f["dead"] and not f.get("closed")]
            for flow in live:
                flow["holed"] = True
            return len(live)

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                budget, self.budget = self.budget, None
            state = {"left": budget, "dead": False, "holed": False}
            with self._lock:
                self._flows.append(state)
            threading.Thread(target=self._pump, args=(client, server, state, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, state, False),
                             daemon=True).start()

    def _cut(self, *socks: socket.socket) -> None:
        for s in socks:
            try:  # linger 0: closed with RST, like a dropped link or a killed NAT entry
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # close alone does not end a socket another thread is blocked reading (the
                # other direction's pump): the server never heard of the cut when it had
                # nothing more to send, and its agent waited for the rest of its input
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, upstream: bool) -> None:
        try:
            while not state["dead"]:
                data = src.recv(65536)
                if not data:
                    break
                if state["holed"]:
                    continue  # dropped on the floor; the sender is never told
                if upstream and state["left"] is not None:
                    state["left"] -= len(data)
                    if state["left"] <= 0:
                        state["dead"] = True
                        self.cuts += 1
                        self._cut(src, dst)
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            state["closed"] = True
            if not state["dead"]:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def host_through(project, server, proxy: CutProxy, name: str = "viaproxy") -> str:
    """Trust ``server``'s host key at the proxy's port in the project's known_hosts, and
    return the ``[hosts.NAME]`` table that reaches the server through ``proxy``."""
    known = project / ".remoteops" / "known_hosts"
    known.write_text(known.read_text() + server.known_hosts_line.replace(
        f"]:{server.port} ", f"]:{proxy.port} "))
    return (f'[hosts.{name}]\nhost = "root@127.0.0.1:{proxy.port}"\n'
            f'identity_file = "{server.client_key}"\n')
