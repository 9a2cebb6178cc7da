"""The shaping proxy really delays every chunk, really caps bandwidth, and counts honestly."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.harness.shaper import ShapingProxy


def _echo_server() -> tuple[socket.socket, int]:
    """An upstream that echoes ping-pong messages; on b"SINK" it swallows and counts."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                if data.startswith(b"SINK"):
                    total = len(data) - 4
                    while True:
                        more = conn.recv(65536)
                        if not more:
                            break
                        total += len(more)
                    conn.sendall(str(total).encode())
                    return
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, listener.getsockname()[1]


@pytest.fixture
def upstream():
    listener, port = _echo_server()
    yield port
    listener.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        assert data, "connection closed early"
        out += data
    return out


def test_ping_pong_pays_a_round_trip_each(upstream):
    rtt_ms, pings = 100, 8
    proxy = ShapingProxy(("127.0.0.1", upstream), rtt_ms=rtt_ms)
    try:
        with socket.create_connection((proxy.host, proxy.port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.monotonic()
            for i in range(pings):
                msg = f"ping {i}".encode()
                sock.sendall(msg)
                assert _recv_exact(sock, len(msg)) == msg
            seconds = time.monotonic() - started
        # each ping-pong waits a full round trip; allow 10 ms of timer slack per trip below
        # and a generous ceiling above (a 2-core CI box)
        assert seconds >= pings * (rtt_ms - 10) / 1000, seconds
        assert seconds < pings * rtt_ms / 1000 * 2.5, seconds
        time.sleep(0.05)
        stats = proxy.snapshot()
        assert stats["round_trips"] == pings, stats
        assert stats["bytes_up"] == stats["bytes_down"] == sum(len(f"ping {i}")
                                                               for i in range(pings))
        assert stats["connections"] == 1
    finally:
        proxy.close()


def test_pipelined_stream_is_delayed_not_serialized(upstream):
    """Many chunks sent back to back arrive about one RTT later in all, not one RTT each."""
    proxy = ShapingProxy(("127.0.0.1", upstream), rtt_ms=100)
    try:
        with socket.create_connection((proxy.host, proxy.port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.monotonic()
            msgs = [f"msg {i:03d}".encode() for i in range(20)]
            for msg in msgs:
                sock.sendall(msg)
                time.sleep(0.005)  # separate chunks on the wire
            want = sum(map(len, msgs))
            assert _recv_exact(sock, want) == b"".join(msgs)
            seconds = time.monotonic() - started
        # 20 chunks over ~0.1 s of sending + one RTT; serialized would be >= 2 s
        assert 0.19 <= seconds < 0.8, seconds
    finally:
        proxy.close()


def test_bandwidth_is_capped(upstream):
    mb, mbps = 1_000_000, 32  # 1 MB at 4 MB/s: >= 0.25 s, minus the 64 KB burst
    proxy = ShapingProxy(("127.0.0.1", upstream), rtt_ms=0, mbps=mbps)
    try:
        with socket.create_connection((proxy.host, proxy.port)) as sock:
            started = time.monotonic()
            sock.sendall(b"SINK" + b"x" * mb)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while data := sock.recv(100):
                answer += data
            seconds = time.monotonic() - started
        assert int(answer) == mb
        floor = (mb - proxy.burst - 65536) / (mbps * 1e6 / 8)  # burst + one chunk in flight
        assert seconds >= floor * 0.95, (seconds, floor)  # >= ~0.22 s
        assert seconds < 1.5, seconds  # and not absurdly slower than the cap
        assert proxy.snapshot()["bytes_up"] == mb + 4
    finally:
        proxy.close()
