"""A deploy in one request: read the manifest delta and the changed files from stdin, apply.

The laptop sends this when its record of the server is current (see
``remoteops.common.deploy_wire`` for the format). The manifest is rebuilt from
``current.json`` and checked against the sha256 the laptop sent; the files are
written under ``.remoteops/incoming/``, checked against their sha256, and only
after the laptop's ``GO`` handed to the usual apply (``Project.apply`` with
``expect_base``: lock, base and disk checks, staging with every file's hash
verified, backup, journal). Anything that does not match changes nothing and
answers ``base_differs``: the laptop then plans against this server as before.
A connection cut before ``GO`` leaves the server as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO

from remoteops.common.deploy_wire import GO, MARK, MAX_HEADER, rebuild
from remoteops.common.errors import RemoteOpsError
from remoteops.common.files import CHUNK
from remoteops.common.manifest import BundleError
from remoteops.server.apply import Project

NO_PAYLOAD = ("the deploy's data did not arrive on stdin; something in the login shell "
              "(~/.bashrc) reads stdin: guard it with [[ $- == *i* ]]")


def read_header(stream: BinaryIO) -> dict:
    """The header after ``MARK`` (whatever came before it is skipped)."""
    seen = b""
    while MARK not in seen:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk or len(seen) > (1 << 20):
            raise RemoteOpsError(NO_PAYLOAD)
        seen += chunk
    rest = seen[seen.index(MARK) + len(MARK):]
    while b"\n" not in rest:
        chunk = stream.read(64)
        if not chunk:
            raise RemoteOpsError(NO_PAYLOAD)
        rest += chunk
    size_text, rest = rest.split(b"\n", 1)
    size = int(size_text)
    if size > MAX_HEADER:
        raise RemoteOpsError("the deploy header is too large; run the deploy again.")
    body = rest + _read_exactly(stream, size - len(rest)) if size > len(rest) else rest[:size]
    if len(body) != size:
        raise RemoteOpsError("the connection was cut while the deploy was sent; nothing was "
                             "changed: run the deploy again.")
    header = json.loads(body.decode("utf-8"))
    header["_leftover"] = rest[size:] if size < len(rest) else b""
    return header


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    parts, left = [], n
    while left > 0:
        chunk = stream.read(min(left, CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def receive(stream: BinaryIO, leftover: bytes, dest: Path, size: int, sha256: str) -> bytes:
    """Write the ``size`` bytes that follow into ``dest``, check their sha256; return what
    was read past them. A short or damaged stream removes ``dest`` and raises."""
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    got = 0
    try:
        with open(part, "wb") as out:
            head, leftover = leftover[:size], leftover[size:]
            for chunk in ([head] if head else []):
                out.write(chunk)
                h.update(chunk)
                got += len(chunk)
            while got < size:
                chunk = stream.read(min(CHUNK, size - got))
                if not chunk:
                    raise RemoteOpsError(f"the connection was cut after {got} of {size} bytes "
                                         "of the deploy; nothing was changed: run it again.")
                out.write(chunk)
                h.update(chunk)
                got += len(chunk)
        if h.hexdigest() != sha256:
            raise BundleError("the files sent do not match their sha256 (damaged in transit); "
                              "nothing was changed: run the deploy again.")
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return leftover


def wait_for_go(stream: BinaryIO, leftover: bytes) -> None:
    """The laptop's go-ahead, sent once its build is done; without it nothing changes."""
    got = leftover + _read_exactly(stream, max(0, len(GO) - len(leftover)))
    if got[:len(GO)] != GO:
        raise RemoteOpsError("the laptop stopped before the deploy was to go ahead; nothing "
                             "was changed.")


def apply_streamed(root: str, stream: BinaryIO) -> dict:
    """Read a one-request deploy from ``stream`` and apply it (see the module docstring)."""
    header = read_header(stream)
    leftover = header.pop("_leftover")
    project = Project(root)
    current = project.current()
    if current is None or current.content_id != header["base"]:
        return project._base_differs(
            "nothing is recorded as deployed there" if current is None else
            f"it has v{current.version} ({current.content_id[:12]}), not "
            f"{str(header['base'])[:12]}")
    try:
        new = rebuild(current, header)
    except BundleError as exc:
        return project._base_differs(str(exc))
    delta = None
    sent = header.get("delta")
    try:
        if sent:
            delta = project.state / "incoming" / f"stream-{sent['sha256'][:32]}.tar.zst"
            leftover = receive(stream, leftover, delta, int(sent["size"]), sent["sha256"])
        wait_for_go(stream, leftover)
        # the tar's sha256 was checked as it arrived; staging checks every file's
        return project.apply(new, delta, header["holder"], int(header["keep"]), None,
                             expect_base=header["base"], expect_agent=header.get("agent"))
    finally:
        if delta is not None:
            delta.unlink(missing_ok=True)


__all__ = ["apply_streamed", "read_header", "receive"]
