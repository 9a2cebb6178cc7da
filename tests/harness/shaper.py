"""A TCP proxy that makes loopback look like a slow, distant link.

Between a client and an upstream (sshd), every chunk read in either direction is held for a
one-way delay and paced by a per-direction bandwidth cap, then forwarded. Chunks are
delayed, not the stream serialized: a reader thread timestamps each chunk into a queue and a
writer thread releases it when its time comes, so a pipelined stream keeps flowing (the
link holds up to a bandwidth-delay product and then some; beyond ``buffer_bytes`` queued the
reader waits, so the sender sees back-pressure as on a real link).

The cap is a token bucket per direction with a small burst: a chunk leaves the bucket when
the link has sent everything before it at ``rate`` bytes/s, then travels ``delay`` seconds.

It counts bytes each way and round trips: the number of times the direction of forwarded
traffic flips from client->server to server->client on a connection (a request answered),
summed over connections. ``snapshot()`` gives totals; diff two to measure one command.
"""

from __future__ import annotations

import collections
import socket
import threading
import time

CHUNK = 65536


class _Direction:
    """One direction of one connection: the timestamped queue and its token bucket."""

    def __init__(self, delay: float, rate: float | None, burst: int, buffer_bytes: int):
        self.delay, self.rate, self.burst, self.buffer_bytes = delay, rate, burst, buffer_bytes
        self.queue: collections.deque = collections.deque()
        self.queued = 0
        self.cond = threading.Condition()
        self.link_free = 0.0  # when the link has sent everything queued so far
        self.closed = False

    def put(self, data: bytes) -> None:
        with self.cond:
            while self.queued >= self.buffer_bytes and not self.closed:
                self.cond.wait()
            if self.closed:
                return  # the far side is gone: nothing will send this any more
            now = time.monotonic()
            if self.rate:
                # token bucket: a burst of ``burst`` bytes goes at once, then ``rate`` bytes/s
                start = max(self.link_free, now - self.burst / self.rate)
                self.link_free = start + len(data) / self.rate
                leave = max(now, self.link_free)
            else:
                leave = now
            self.queue.append((leave + self.delay, data))
            self.queued += len(data)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def get(self) -> bytes | None:
        """The next chunk once its release time has come; None once closed and drained."""
        with self.cond:
            while True:
                if self.queue:
                    due, data = self.queue[0]
                    wait = due - time.monotonic()
                    if wait <= 0:
                        self.queue.popleft()
                        self.queued -= len(data)
                        self.cond.notify_all()
                        return data
                    self.cond.wait(wait)
                elif self.closed:
                    return None
                else:
                    self.cond.wait()


class ShapingProxy:
    """Forwards ``host:<port>`` to ``upstream`` with ``rtt_ms / 2`` delay each way and at most
    ``mbps`` megabits/s each way (None: no cap). ``close()`` stops accepting."""

    def __init__(self, upstream: tuple[str, int], rtt_ms: float = 100, mbps: float | None = None,
                 host: str = "127.0.0.1", burst_bytes: int = 64 * 1024,
                 buffer_bytes: int | None = None):
        self.upstream = upstream
        self.delay = rtt_ms / 2000.0
        self.rate = mbps * 1e6 / 8 if mbps else None
        self.burst = burst_bytes
        bdp = int((self.rate or 100e6) * self.delay * 2)
        self.buffer_bytes = buffer_bytes or max(4 << 20, 2 * bdp)
        self.listener = socket.create_server((host, 0))
        self.host, self.port = self.listener.getsockname()[:2]
        self._lock = threading.Lock()
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        self.round_trips = 0
        self.connections = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> dict:
        with self._lock:
            return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                    "round_trips": self.round_trips, "connections": self.connections}

    @staticmethod
    def delta(before: dict, after: dict) -> dict:
        return {k: after[k] - before[k] for k in after}

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
            conn = {"last": None, "open": 2}
            for src, dst, up in ((client, server, True), (server, client, False)):
                d = _Direction(self.delay, self.rate, self.burst, self.buffer_bytes)
                threading.Thread(target=self._read, args=(src, d), daemon=True).start()
                threading.Thread(target=self._write, args=(d, dst, src, conn, up),
                                 daemon=True).start()

    def _read(self, src: socket.socket, d: _Direction) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                d.put(data)
        except OSError:
            pass
        finally:
            d.close()

    def _write(self, d: _Direction, dst: socket.socket, src: socket.socket, conn: dict,
               up: bool) -> None:
        try:
            while True:
                data = d.get()
                if data is None:
                    break
                with self._lock:
                    if up:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                        if conn["last"] is True:
                            self.round_trips += 1
                    conn["last"] = up
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)  # pass the EOF on, after the delayed data
        except OSError:
            d.close()
        finally:
            with self._lock:
                conn["open"] -= 1
                last = conn["open"] == 0
            if last:
                for s in (src, dst):
                    try:
                        s.close()
                    except OSError:
                        pass

    def close(self) -> None:
        self._stop = True
        self.listener.close()
