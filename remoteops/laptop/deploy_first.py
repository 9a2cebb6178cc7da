"""A first deploy's tar sent before its manifest: the laptop's side of ``server/stream_first``.

A deploy without a record opens its ``deploy-stream`` request with the connection
(``deploy_planned.Planned``) and used to send the manifest, wait for the plan and only
then the tar: the upload started once every file was hashed, ~0.3 s into a 2,000-file,
145 MB first deploy on the bench, while its tar had been written since ~0.2 s.

``FirstStream`` sends a probe as soon as the request is open (is the root empty, how
much disk is free). When the build then writes a first bundle (its tar compressed while
the files are hashed, ``build.EarlyTar``: ``start``) and the root is empty with room for
the upload and its files, a thread sends the tar as it is written, and the manifest
follows in a control frame as soon as the hashing gives it (``manifest``); ``plan`` is
the server's plan and ``finish`` sends the go-ahead once the build is complete.
Otherwise the same request is a planned one: the manifest goes to ``Planned.ask`` when
it is known. An agent that does not know the probe (an older one, which answers without
``empty`` and ends its request) or none at all: ``how`` is ``"old"`` and the deploy
opens a planned request as before.
"""

from __future__ import annotations

import json
import threading
from typing import Callable

from remoteops import __version__
from remoteops.common.deploy_wire import GO, chunk_frame, control_frame, framed_header
from remoteops.common.errors import ConnectError, RemoteCommandError
from remoteops.common.manifest import DISK_HEADROOM
from remoteops.common.target import AgentMissing
from remoteops.laptop.background import Background
from remoteops.laptop.build import Built
from remoteops.laptop.deploy_common import holder
from remoteops.laptop.deploy_full import TarTap
from remoteops.laptop.deploy_planned import Planned

SEND_TAR = b'{"send":"tar"}\n'
# At most this much of the tar goes before its manifest: until then the server's part file
# has no content id in its name, and a cut upload cannot be resumed (after it, it can).
UNNAMED_MAX = 64 << 20


class FirstStream:
    """The probe, then the tar before its manifest, on ``planned``'s request (see module)."""

    def __init__(self, settings, target, planned: Planned, tap: TarTap,
                 progress: Callable[[int, int], None] | None):
        self.settings, self.target, self.planned, self.tap = settings, target, planned, tap
        self.progress = progress
        self.sent = 0  # bytes this request sent (probe, tar, manifest, trailer)
        self.upload = 0  # bytes of the tar sent
        self._cond = threading.Condition()
        self._size: int | None = None  # a first bundle's files' total, once its tar started
        self._manifest = None
        self._frame: bytes | None = None  # the manifest's control frame, until sent
        self._how: str | None = None  # "stream", "planned" or "old", once decided
        self._stopped = False
        self.job = Background(self._run)  # the probe goes as soon as the request is open

    def start(self, size: int) -> None:
        """A first bundle's tar is being written (``size``: its files' total)."""
        with self._cond:
            self._size = size
            self._cond.notify_all()

    def manifest(self, manifest) -> None:
        """The files are hashed: the manifest follows the tar, or asks for a plan."""
        frame = control_frame(json.dumps({"manifest": manifest.to_dict()},
                                         separators=(",", ":")).encode())
        with self._cond:
            self._manifest, self._frame = manifest, frame
            self._cond.notify_all()

    def how(self) -> str:
        """``stream`` (the tar goes; ``plan`` and ``finish`` follow), ``planned`` (the request
        plans: the manifest went to ``Planned.ask``) or ``old`` (the agent ended the request
        without knowing the probe, or is missing)."""
        with self._cond:
            while self._how is None and not self.job.done():
                self._cond.wait(0.05)
            if self._how == "stream":
                return self._how
        self.job.result()  # the manifest handed on (or what stopped it, raised)
        return self._how or "old"

    def plan(self) -> dict:
        """The server's plan of the streamed tar (made when its manifest arrived)."""
        try:
            return self.planned.request.answer()
        except Exception as exc:
            if self.job.done():
                self.job.result()  # what stopped the sending (a file that changed) comes first
            if isinstance(exc, ConnectError):
                raise self._broke(exc) from None
            raise

    def finish(self, built: Built) -> dict:
        """Wait until the tar is sent and the build complete, go ahead; the agent's answer."""
        request = self.planned.request
        try:
            self.job.result()
            built.wait()  # the tar is complete and renamed into place, the manifest written
            request.send(GO)
            self.sent += len(GO)
            answer = request.finish()
        except ConnectError as exc:
            request.cancel()
            raise self._broke(exc) from None
        except BaseException:
            request.cancel()
            raise
        self.planned.request = None  # answered: nothing to cancel
        return answer

    def _broke(self, exc: ConnectError) -> ConnectError:
        return ConnectError(f"the connection to {self.target.name} broke during the upload "
                            f"after {self.upload / 1e6:.1f} MB ({exc}); run the same command "
                            "again: the upload resumes where it stopped.")

    def cancel(self) -> None:
        """Stop: no go-ahead goes, the server changes nothing."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self.planned.cancel()  # ends a wait for the agent too
        self.job.settle()
        self.planned.cancel()  # a request the thread opened meanwhile

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        request = self.planned.opening.result()
        self.planned.request = request
        level = int(self.settings["bundle.compression_level"])
        data = framed_header({
            "first": {"name": f"whole-{level}"}, "base": None, "holder": holder("deploy v1"),
            "keep": int(self.settings["deploy.keep_backups"]), "agent": __version__})
        request.send(data)
        self.sent += len(data)
        try:
            answer = request.answer()
        except (AgentMissing, RemoteCommandError):  # no agent, or one that ended on it
            answer = {}
        with self._cond:
            while self._size is None and self._manifest is None and not self._stopped:
                self._cond.wait()
            size = self._size
        stream = answer.get("empty") is True and size is not None and \
            int(answer.get("free_bytes") or 0) >= 2 * size + DISK_HEADROOM
        with self._cond:
            self._how = "stream" if stream else ("planned" if "empty" in answer else "old")
            self._cond.notify_all()
        if stream:
            request.send(SEND_TAR)
            self.sent += len(SEND_TAR)
            try:
                self._stream(request, size)
            except BaseException:
                request.cancel()  # the agent stops waiting for the rest: nothing changes
                raise
        elif self._how == "planned":  # the same request plans, once the manifest is known
            manifest = self._wait_manifest()
            if manifest is not None:
                self.planned.ask(manifest)
                self.planned.job.result()

    def _wait_manifest(self):
        with self._cond:
            while self._manifest is None and not self._stopped:
                self._cond.wait()
            return self._manifest

    def _send_frame(self, request) -> None:
        with self._cond:
            frame, self._frame = self._frame, None
        if frame is not None:
            request.send(frame)
            self.sent += len(frame)

    def _stream(self, request, size: int) -> None:
        for fh, start, length in self.tap.ranges(None):
            if request.closed or self._stopped:
                return  # the agent stopped reading: its answer (or the lost connection) says
            if self.upload >= UNNAMED_MAX and self._manifest is None:
                self._wait_manifest()  # no more before the upload has a resumable name
            self._send_frame(request)
            request.send_file(fh, start, length, length.to_bytes(8, "big"))  # a chunk frame
            self.upload += length
            self.sent += length + 8
            if self.progress:
                self.progress(self.upload, max(self.upload, size))
        if self._wait_manifest() is None:
            return
        self._send_frame(request)
        trailer = chunk_frame(b"") + json.dumps({"size": self.upload, "offset": 0}).encode() \
            + b"\n"
        request.send(trailer)
        self.sent += len(trailer)


__all__ = ["FirstStream"]
