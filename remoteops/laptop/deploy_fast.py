"""The deploy's fast path: one ``deploy-apply --expect-base`` from a plan made here.

After a deploy (or a plan) the laptop records which manifest is deployed on each
target and root (``deploy_record``). The next deploy plans locally against that
record, sends the manifest and the changed files (SFTP, no shell) and runs one
agent command: the server checks that it really has that base and that its disk
matches it; when not, it changes nothing and says so, and the deploy plans
against the server as usual.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from remoteops.common.config import Settings
from remoteops.common.errors import RemoteCommandError
from remoteops.common.target import AgentMissing, Target
from remoteops.common.files import sha256_file
from remoteops.common.manifest import DISK_HEADROOM, Manifest, manifest_for, plan_between
from remoteops.laptop.build import Built
from remoteops.laptop.delta import project_sources, write_delta
from remoteops.laptop.background import Background
from remoteops.laptop.deploy_common import (WHOLE_BUNDLE_SHARE, DeployOutcome, apply_args,
                                            bundles_dir, delta_key, state_dir, upload_file)
from remoteops.laptop.deploy_record import remember
from remoteops.laptop.transfer import put_resumable



class FastPath:
    """One ``deploy-apply --expect-base`` from a plan made here against the record.

    ``start`` (in the background, possibly while the tar is still being written)
    writes the delta, starts the agent, which waits for its files, uploads the delta
    and the manifest under a temporary name; ``finish`` renames the manifest into
    place, the agent's signal to go, once the bundle is complete, and reads the
    answer. Nothing changes on the server before ``finish``.
    """

    def __init__(self, settings: Settings, target: Target, base: Manifest, free: int):
        self.settings, self.target, self.base, self.free = settings, target, base, free
        self.manifest: Manifest | None = None
        self.plan: dict | None = None
        self.job: Background | None = None
        self.args: list[str] = []

    def plan_for(self, manifest: Manifest) -> dict | None:
        """The plan from the recorded base (None: the server must plan, e.g. disk may be short)."""
        if self.manifest is not None and self.manifest.content_id == manifest.content_id:
            return self.plan
        plan = plan_between(self.base, manifest)
        sizes = manifest.file_map()
        if self.free < 2 * sum(sizes[p].size for p in plan["need"]) + DISK_HEADROOM:
            plan = None  # maybe short of disk: the server's plan checks before the upload
        else:
            plan.update(free_bytes=self.free, current_version=self.base.version,
                        current_content_id=self.base.content_id,
                        agent_version=manifest.toolkit_version,
                        root=self.target.project_root, recovery_pending=None)
        self.manifest, self.plan, self.job = manifest, plan, None
        return plan

    def start(self, connected: Background, remote_manifest: str, data: bytes,
              tar: Path | None, progress: Callable[[int, int], None] | None) -> None:
        """Begin in the background; ``tar`` None: the bundle is not written yet."""
        self.job = Background(self._start, connected, remote_manifest, data, tar, progress)

    def _start(self, connected: Background, remote_manifest: str, data: bytes,
               tar: Path | None, progress: Callable[[int, int], None] | None):
        manifest, target, need = self.manifest, self.target, self.plan["need"]
        delta = remote_delta = None
        if need:
            key = delta_key(manifest, need)
            out_dir = bundles_dir(self.settings) / ".delta" if tar is None else \
                tar.parent / ".delta"
            if tar is None:
                delta = delta_from_sources(self.settings, manifest, need, out_dir, key)
                if delta is None:
                    return None  # needs the bundle's bytes: start again once it is written
            else:
                delta = upload_file(self.settings, Built(tar, manifest_for(tar), manifest),
                                     need, out_dir, key)
            remote_delta = f"{state_dir(target)}/incoming/{delta.name}"
        args = apply_args(self.settings, target, manifest, remote_manifest,
                          (remote_delta, sha256_file(delta)) if delta is not None else None,
                          expect_base=self.base.content_id)
        connected.result()
        # the agent starts (login shell, Python) while the files travel; it waits for them
        self.args = args
        agent = Background(lambda: target.run_agent(*args, timeout=3600))
        # (should this fail, the manifest never follows: the agent gives up when the
        # connection closes, having changed nothing)
        sent = 0
        if delta is not None:
            sent = put_resumable(target, delta, remote_delta, progress)
        part = remote_manifest + ".part"
        target.remove(part)
        with target.open_append(part) as fh:
            fh.write(data)
        return agent, sent, delta.stat().st_size if delta is not None else 0

    def cancel(self) -> None:
        """Wait for the background start (the manifest is not renamed: nothing applies)."""
        if self.job is not None:
            self.job.settle()

    def finish(self, outcome: DeployOutcome, remote_manifest: str, data: bytes,
               built: Built, connected: Background, progress) -> bool:
        """Go: send the manifest, read the answer. False: plan against the server instead."""
        started = self.job.result() if self.job is not None else None
        if started is None:  # not started yet, or it needed the finished bundle
            self.start(connected, remote_manifest, data, built.tar_path, progress)
            started = self.job.result()
        agent, sent, upload_bytes = started
        outcome.sent_bytes += sent + len(data)
        outcome.upload_bytes = upload_bytes
        self.target.rename(remote_manifest + ".part", remote_manifest)  # go
        try:
            try:
                answer = agent.result()
            except RemoteCommandError as exc:
                if "is not on the server" not in str(exc):
                    raise
                # the bundle took longer to write than the agent waits: ask again
                answer = self.target.run_agent(*self.args, timeout=3600)
        except AgentMissing:
            outcome.events.append(f"no remoteops agent found on {self.target.name}")
            return False
        except RemoteCommandError as exc:
            if "No such option" not in str(exc):
                raise
            return False  # an agent that predates --expect-base: plan as usual
        free_after = answer.pop("free_bytes", None)
        if answer.get("base_differs"):
            outcome.events.append(f"the server is not as last deployed from here "
                                  f"({answer['reason']}); planned against it")
            return False
        remember(self.settings, self.target, built.manifest_path, built.manifest, free_after)
        outcome.applied = None if answer.get("noop") else answer
        return True


def delta_from_sources(settings: Settings, manifest: Manifest, need: list[str], out_dir: Path,
                        key: str) -> Path | None:
    """The delta written from the project's files (None: they no longer match the manifest)."""
    sizes = manifest.file_map()
    if sum(sizes[p].size for p in need) >= WHOLE_BUNDLE_SHARE * max(1, manifest.total_size):
        return None  # the bundle itself is the upload
    if project_sources(manifest, need, settings.project_dir) is None:
        return None
    try:
        return write_delta(Path(os.devnull), need, out_dir / f"{manifest.project}-{key}.tar.zst",
                           int(settings["bundle.compression_level"]), manifest=manifest,
                           source_dir=settings.project_dir)
    except Exception:  # noqa: BLE001 - a file changed meanwhile: from the bundle, once written
        return None
