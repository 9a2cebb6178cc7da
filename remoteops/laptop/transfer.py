"""Resumable, verified, progress-reporting uploads (SFTP, never the shell).

An upload goes to ``<remote>.part`` and is renamed into place when complete. A
cut connection leaves the part file; the next upload of the same file (the
name carries its content hash) appends from where the server's copy ends. The
receiver verifies the sha256 before anything uses it.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

from remoteops.common.files import CHUNK
from remoteops.common.errors import ConnectError
from remoteops.common.target import Target

Progress = Callable[[int, int], None]


def put_resumable(target: Target, local: Path, remote: str,
                  progress: Progress | None = None) -> int:
    """Upload ``local`` to ``remote``; return the bytes actually sent this time."""
    import paramiko

    total = local.stat().st_size
    part = remote + ".part"
    have = target.size(part) or 0
    if have > total:
        target.remove(part)
        have = 0
    sent = 0
    if progress:
        progress(have, total)
    try:
        with open(local, "rb") as src, target.open_append(part) as dst:
            src.seek(have)
            for chunk in iter(lambda: src.read(CHUNK), b""):
                dst.write(chunk)
                sent += len(chunk)
                if progress:
                    progress(have + sent, total)
        # paramiko's pipelined SFTP file can end a cut upload without an error (its close
        # swallows one), and the next call reconnects: the part must be whole before rename
        arrived = target.size(part)
        if arrived != total:
            raise EOFError(f"{arrived or 0} of {total} bytes arrived")
        target.rename(part, remote)
    except (socket.error, EOFError, paramiko.SSHException) as exc:
        raise ConnectError(f"the connection to {target.name} broke during the upload after "
                           f"{(have + sent) / 1e6:.1f} of {total / 1e6:.1f} MB ({exc}); run the "
                           "same command again: the upload resumes where it stopped.") from None
    return sent
