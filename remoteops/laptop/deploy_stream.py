"""The redeploy in one request: ``deploy-stream`` with the manifest delta and files on stdin.

When the laptop's record of the server is current (``deploy_record``) it plans
locally (``FastPath.plan_for``) and sends, on the stdin of one agent command,
the manifest delta (the changed entries and the sha256 of the whole manifest,
``common/deploy_wire``), then the changed files as one tar (``delta``), and,
once the bundle is built, the go-ahead. No SFTP, no second command: a login,
one channel, one answer. The server checks the base, the rebuilt manifest's
hash and its disk; when anything differs it changes nothing and the deploy
plans against the server on a second request (``replan``; ``deploy_planned``:
the manifest on its stdin, the files streamed after the plan), or, when the agent
could not take the stream at all, sends the manifest and plans as before.
An upload larger than ``STREAM_MAX`` goes the resumable SFTP way instead
(``FastPath``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from remoteops.common.deploy_wire import GO, encode_header
from remoteops.common.errors import RemoteCommandError
from remoteops.common.files import CHUNK, sha256_file
from remoteops.common.manifest import manifest_for
from remoteops.common.target import AgentMissing
from remoteops.laptop.agent_stream import STDIN_EVENT, AgentStream, not_streamable
from remoteops.laptop.build import Built
from remoteops.laptop.background import Background
from remoteops.laptop.deploy_common import (DeployOutcome, bundles_dir, delta_key, holder,
                                            upload_file)
from remoteops.laptop.deploy_fast import FastPath, delta_from_sources
from remoteops.laptop.deploy_record import remember
from remoteops.laptop.patches import make_patches

# Uploads larger than this go through SFTP, which resumes after a cut connection.
STREAM_MAX = 64 << 20


class StreamPath(FastPath):
    """``FastPath``'s plan, sent as one ``deploy-stream`` request (see the module)."""

    request: AgentStream | None = None
    opening: Background | None = None
    replan = False  # the server is not as recorded: the deploy plans on a request instead

    def prestart(self, connected: Background) -> None:
        """Start the agent as soon as the connection is open: its Python starts while the
        laptop still hashes the project (it waits for the request on stdin)."""
        def open_request() -> AgentStream:
            connected.result()
            return AgentStream(self.target, ["deploy-stream", "--root",
                                             self.target.project_root], 3600)

        self.opening = Background(open_request)

    def start(self, connected: Background, remote_manifest: str, data: bytes,
              tar: Path | None, progress: Callable[[int, int], None] | None) -> None:
        self.job = Background(self._send, connected, remote_manifest, data, tar, progress)

    def _send(self, connected: Background, remote_manifest: str, data: bytes,
              tar: Path | None, progress: Callable[[int, int], None] | None):
        manifest, need = self.manifest, self.plan["need"]
        delta = None
        patches = make_patches(self.settings, self.base, manifest, need) if need else {}
        whole = [p for p in need if p not in patches]
        if whole:
            need = whole
            key = delta_key(manifest, need)
            if tar is None:
                delta = delta_from_sources(self.settings, manifest, need,
                                           bundles_dir(self.settings) / ".delta", key)
                if delta is None:
                    return None  # needs the bundle's bytes: start again once it is written
            else:
                delta = upload_file(self.settings, Built(tar, manifest_for(tar), manifest),
                                    need, tar.parent / ".delta", key)
            if delta.stat().st_size > STREAM_MAX:  # resumable SFTP instead
                self._drop_request()
                return "sftp", super()._start(connected, remote_manifest, self._bytes(data),
                                              tar, progress)
        size = delta.stat().st_size if delta is not None else 0
        info = {"size": size, "sha256": sha256_file(delta)} if delta is not None else None
        header = encode_header(self.base, manifest, info, {
            "holder": holder(f"deploy v{manifest.version}"), "agent": manifest.toolkit_version,
            "keep": int(self.settings["deploy.keep_backups"]),
            "patches": [[p, old, len(patch)] for p, (old, patch) in patches.items()]})
        connected.result()
        if self.opening is not None:
            self.request, self.opening = self.opening.result(), None
        else:
            self.request = AgentStream(self.target, ["deploy-stream", "--root",
                                                     self.target.project_root], 3600)
        request = self.request
        request.send(header)
        if delta is not None:
            with open(delta, "rb") as fh:
                done = 0
                for chunk in iter(lambda: fh.read(CHUNK), b""):
                    request.send(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, size)
        for _, patch in patches.values():
            request.send(patch)
        size += sum(len(patch) for _, patch in patches.values())
        return "stream", (request, len(header) + size + len(GO), size, delta)

    def cancel(self) -> None:
        """Stop a request under way without its go-ahead: the server changes nothing."""
        if self.job is not None:
            self.job.settle()
        self._drop_request()

    def _drop_request(self) -> None:
        if self.opening is not None:
            self.opening.settle()
            try:
                self.request = self.opening.result()
            except Exception:  # noqa: BLE001 - it never started: nothing to stop
                pass
            self.opening = None
        if self.request is not None:
            self.request.cancel()
            self.request = None

    def finish(self, outcome: DeployOutcome, remote_manifest: str, data: bytes,
               built: Built, connected: Background, progress) -> bool:
        """Go ahead and read the answer. False: the manifest is on the server now and the
        deploy plans against it."""
        started = self.job.result() if self.job is not None else None
        if started is None:  # not started yet, or it needed the finished bundle
            built.wait()
            self.start(connected, remote_manifest, data, built.tar_path, progress)
            started = self.job.result()
        how, started = started
        if how == "sftp":
            self.job = Background(lambda: started)
            return super().finish(outcome, remote_manifest, self._bytes(data), built,
                                  connected, progress)
        request, sent, upload_bytes, delta = started
        request.send(GO)
        outcome.sent_bytes += sent
        outcome.upload_bytes = upload_bytes
        try:
            answer = request.finish()
        except AgentMissing:
            outcome.events.append(f"no remoteops agent found on {self.target.name}")
            return self._fall_back(outcome, remote_manifest, data)
        except RemoteCommandError as exc:
            if not not_streamable(exc):
                raise
            outcome.events.append(STDIN_EVENT if "stdin" in str(exc) else
                                  f"the agent on {self.target.name} cannot take a streamed "
                                  "deploy; planned against it")
            return self._fall_back(outcome, remote_manifest, data)
        free_after = answer.pop("free_bytes", None)
        if answer.get("base_differs"):
            outcome.events.append(f"the server is not as last deployed from here "
                                  f"({answer['reason']}); planned against it")
            self.replan = True  # the agent there streams: it plans on the next request
            return False
        if delta is not None:
            _drop(delta)
        remember(self.settings, self.target, built.manifest_path, built.manifest, free_after)
        outcome.applied = None if answer.get("noop") else answer
        return True

    def _bytes(self, data: bytes | None) -> bytes:
        """The whole manifest's JSON (None: not made yet; only a fallback needs it, and
        making it costs a 2,000-file redeploy about 0.1 s before it can send anything)."""
        return data if data is not None else self.manifest.to_json().encode("utf-8")

    def _fall_back(self, outcome: DeployOutcome, remote_manifest: str,
                   data: bytes | None) -> bool:
        """The whole manifest to the server, for its own plan (the usual path)."""
        data = self._bytes(data)
        self.target.write_bytes(remote_manifest, data)
        outcome.sent_bytes += len(data)
        return False


def _drop(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["StreamPath", "STREAM_MAX"]
