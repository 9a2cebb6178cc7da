"""A deploy the server planned, in one more request: the files streamed to ``deploy-stream``.

Without a current record the server plans (``deploy-plan``, run while the bundle
is hashed); then the laptop sends the whole manifest and a tar of what the plan
needs on the stdin of ``deploy-stream`` (``send_tar``), started with the
connection. When (nearly) every file is needed that tar is the bundle itself,
sent as ``write_tar`` produces it (``TarTap``): compression, the upload and the
server's writing overlap. Otherwise it is a delta. The server keeps what arrived
under a name that carries the content id: after a cut connection the next plan
reports how much it has (``stream_parts``) and the upload resumes there (the tars
are deterministic, so the bytes are the same). The server checks the tar's size,
each member against the manifest and every file's sha256 before anything changes.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Iterator

from remoteops.common.deploy_wire import GO, chunk_frame, framed_header
from remoteops.common.bundle_tar import BundleError
from remoteops.common.errors import ConnectError, RemoteCommandError
from remoteops.common.files import CHUNK
from remoteops.laptop.agent_stream import AgentStream, not_streamable
from remoteops.laptop.build import Built
from remoteops.laptop.background import Background
from remoteops.laptop.deploy_common import WHOLE_BUNDLE_SHARE, holder


class TarTap:
    """What ``write_tar`` has written so far, readable while it goes on (``chunks``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fh = None
        self._written = 0
        self._done = False
        self._error: BaseException | None = None

    # -- told by write_tar (the build's thread) ------------------------------------------
    def opened(self, path: str) -> None:
        with self._cond:
            self._fh = open(path, "rb")  # stays readable once renamed into place
            self._cond.notify_all()

    def wrote(self, total: int) -> None:
        with self._cond:
            self._written = total
            self._cond.notify_all()

    def closed(self, error: BaseException | None) -> None:
        with self._cond:
            self._done, self._error = True, error
            self._cond.notify_all()

    # -- read by the sender ---------------------------------------------------------------
    def ranges(self, built: Built | None, offset: int = 0) -> Iterator[tuple]:
        """The tar from ``offset`` as ``(file, start, length)`` ranges of at most ``CHUNK``,
        each as soon as it is written (a bundle reused as it was: from its file); the
        sender moves them without reading them (``AgentStream.send_file``). ``built``:
        None while the build still hashes (a first bundle's tar, being written)."""
        with self._cond:
            while self._fh is None and not self._done and (built is None or (
                    built.pending is not None and built.pending.is_alive())):
                self._cond.wait(0.05)
            fh = self._fh
            if fh is None and built is None:
                raise self._error or BundleError("the bundle's tar was not written; build "
                                                 "it again.")
        if fh is None:  # nothing was written: the tar is there already (or the build failed)
            built.wait()
            fh = open(built.tar_path, "rb")
            self._written, self._done = built.tar_path.stat().st_size, True
        with fh:
            pos = offset
            while True:
                with self._cond:
                    while self._written <= pos and not self._done:
                        self._cond.wait()
                    if self._error is not None:
                        raise self._error
                    end, done = self._written, self._done
                while pos < end:
                    length = min(CHUNK, end - pos)
                    yield fh, pos, length
                    pos += length
                if done and pos >= end:
                    return


def wants_whole_bundle(built: Built, need: list[str]) -> bool:
    sizes, total = built.manifest.file_map(), built.manifest.total_size
    return sum(sizes[p].size for p in need) >= WHOLE_BUNDLE_SHARE * max(1, total)


def open_request(target, connected: Background) -> Background:
    """``deploy-stream`` started as soon as the connection is open (its Python starts while
    the laptop hashes and the server plans); ``close_request`` when it is not used."""
    def start() -> AgentStream:
        connected.result()
        return AgentStream(target, ["deploy-stream", "--root", target.project_root], 3600)

    return Background(start)


def close_request(opening: Background | None) -> None:
    if opening is None:
        return
    opening.settle()
    try:
        opening.result().cancel()
    except Exception:  # noqa: BLE001 - it never started: nothing to close
        pass


def request_header(settings, manifest, **more) -> dict:
    """What ``deploy-stream`` is told first when the server plans: the whole manifest."""
    return {"manifest": manifest.to_dict(), "holder": holder(f"deploy v{manifest.version}"),
            "keep": int(settings["deploy.keep_backups"]), "agent": manifest.toolkit_version,
            **more}


def file_ranges(path: Path, offset: int = 0) -> Iterator[tuple]:
    """A written file from ``offset`` as ``TarTap.ranges`` gives a tar being written."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        for start in range(offset, size, CHUNK):
            yield fh, start, min(CHUNK, size - start)


def send_tar(settings, target, built: Built, ranges: Iterator[tuple], name: str, offset: int,
             progress: Callable[[int, int], None] | None, total: int,
             opening: Background | None = None,
             request: AgentStream | None = None) -> tuple[dict | None, int]:
    """Stream a tar of the bundle's files (``ranges``: the whole bundle as it is written, or
    a delta; each range becomes a ``chunk_frame``),
    from ``offset`` (what the server kept of a cut upload of the same ``name``), to
    ``deploy-stream`` (``opening``: one started already; ``request``: one that made the
    plan and waits for what follows), which applies it as planned there; the agent's
    answer (None: it could not read the stream, nothing changed) and the bytes sent."""
    import json

    delta = {"chunked": True, "offset": offset, "name": name}
    if request is None:
        request = (opening or open_request(target, Background(lambda: None))).result()
        preamble = framed_header(request_header(settings, built.manifest, delta=delta))
    else:
        preamble = json.dumps({"send": "tar", **delta}).encode() + b"\n"
    sent = len(preamble)
    done = offset
    try:
        request.send(preamble)
        for fh, start, length in ranges:
            if request.closed:
                break  # the agent stopped reading: its answer (or the lost connection) says why
            request.send_file(fh, start, length, length.to_bytes(8, "big"))  # a chunk frame
            done += length
            sent += length + 8
            if progress:
                progress(done, max(done, total))
        built.wait()  # the tar is complete and renamed into place
        trailer = chunk_frame(b"") + json.dumps({"size": done, "offset": offset}).encode() \
            + b"\n" + GO
        request.send(trailer)
        sent += len(trailer)
        return request.finish(), sent
    except RemoteCommandError as exc:
        if not not_streamable(exc):
            raise
        return None, sent  # the caller uploads by SFTP instead
    except ConnectError as exc:
        request.cancel()
        raise ConnectError(f"the connection to {target.name} broke during the upload after "
                           f"{done / 1e6:.1f} MB ({exc}); run the same command again: the upload "
                           "resumes where it stopped.") from None
    except BaseException:
        request.cancel()
        raise


__all__ = ["TarTap", "send_tar", "file_ranges", "request_header", "wants_whole_bundle",
           "open_request",
           "close_request"]
