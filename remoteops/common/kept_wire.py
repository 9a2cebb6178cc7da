"""Frames between the laptop's kept connection and the server's resident agent.

One frame is a kind byte, a 4-byte big-endian length and that many bytes. The same
frames travel laptop command -> keeper (a local Unix socket) and keeper -> resident
(the stdin/stdout of one long-lived SSH command), so the keeper mostly passes them on.

Towards the server: ``Q`` a request (JSON ``{"argv": [...]}``: the agent's arguments),
``I`` bytes for its stdin, ``E`` the end of its stdin.
Towards the laptop: ``H`` the resident is ready (JSON), ``S`` the request started,
``N`` it did not start (a reason: ``busy``, ``stale``, ...; nothing ran, so the caller
may go another way), ``O``/``R`` bytes of its stdout/stderr, ``X`` its exit code
(decimal), ``L`` the connection to the server was lost while it ran.
"""

from __future__ import annotations

import json
import struct

HEAD = struct.Struct(">cI")
READY = b"@@REMOTEOPS-RESIDENT@@\n"  # the resident's first line: frames follow (a login
                                     # shell may print banners before it)
MAX_PAYLOAD = 16 << 20  # a frame is at most a chunk of a file (1 MiB) or a small JSON

REQUEST, INPUT, END = b"Q", b"I", b"E"
HELLO, STARTED, NOT_STARTED, OUT, ERR, EXIT, LOST = b"H", b"S", b"N", b"O", b"R", b"X", b"L"


class FrameError(ValueError):
    """Bytes that are not frames: the other side is not what it should be."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEAD.pack(kind, len(payload)) + payload


def json_frame(kind: bytes, data: dict) -> bytes:
    return frame(kind, json.dumps(data, separators=(",", ":")).encode("utf-8"))


def check_head(head: bytes) -> tuple[bytes, int]:
    """A frame's kind and payload size from its ``HEAD.size`` bytes; FrameError when they
    cannot be a frame's."""
    kind, size = HEAD.unpack_from(head)
    if size > MAX_PAYLOAD or not kind.isalpha():
        raise FrameError(f"not a frame (kind {kind!r}, {size} bytes)")
    return kind, size


class Frames:
    """Parses frames out of bytes fed in pieces (``feed`` returns the complete ones)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buffer += data
        out = []
        while len(self._buffer) >= HEAD.size:
            kind, size = check_head(self._buffer)
            if len(self._buffer) < HEAD.size + size:
                break
            out.append((kind, bytes(self._buffer[HEAD.size:HEAD.size + size])))
            del self._buffer[:HEAD.size + size]
        return out


def read_frames(read, frames: Frames | None = None):
    """Frames from ``read(n)`` (a socket's recv, a pipe's read) until it ends."""
    frames = frames or Frames()
    while True:
        data = read(1 << 20)
        if not data:
            return
        yield from frames.feed(data)


__all__ = ["Frames", "FrameError", "check_head", "frame", "json_frame", "read_frames",
           "REQUEST", "INPUT", "END", "READY", "HELLO", "STARTED", "NOT_STARTED", "OUT", "ERR",
           "EXIT", "LOST"]
