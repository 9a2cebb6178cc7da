"""Laptop side of deploys: plan against the server, upload what differs, apply, roll back.

The heavy lifting runs on the server in one agent command each (plan, apply,
rollback), never file by file over SSH. The agent is installed from the
bundle's own wheel when it is missing or its version differs.

What waits on the network overlaps with local work: the SSH connection opens
while the bundle is hashed; the manifest upload and the plan run while the tar
is compressed; the agent starts while the manifest is still being sent (it
waits for the file). When (nearly) every file is needed, the bundle itself is
the upload, so nothing is compressed twice.

Fast path: after a deploy (or a plan) the laptop records which manifest is
deployed on each target and root (``<bundles>/.deployed/<key>.json``). The next
deploy plans locally against that record, sends the manifest and the changed
files (SFTP, no shell) and runs one agent command, ``deploy-apply
--expect-base``: the server checks that it really has that base and that its
disk matches it; when not, it changes nothing and says so, and the deploy
plans against the server as before. Dry runs always plan on the server.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from remoteops.laptop.build import (BundleError, Built, Manifest, _project_sources, build_bundle,
                               content_id, load_manifest, manifest_for, plan_between,
                               read_member_bytes, sha256_file, verify_bundle, write_delta)
from remoteops.common.files import write_atomic_json
from remoteops.common.config import Settings
from remoteops.common.errors import RemoteCommandError, RemoteOpsError
from remoteops.laptop.targets import AgentMissing, SSHTarget, Target, shell_path
from remoteops.laptop.transfer import put_resumable

Confirm = Callable[[dict], bool]
# Upload the bundle itself rather than a delta when the plan needs this share of its bytes.
WHOLE_BUNDLE_SHARE = 0.9
# Where the laptop records what each target has deployed (under the bundles folder).
DEPLOYED_DIR = ".deployed"
# Disk headroom the server must have had (at its last answer) for the fast path.
HEADROOM = 16 << 20


class _Background:
    """A function run in a thread; ``result()`` waits and re-raises its exception."""

    def __init__(self, fn: Callable, *args):
        self._value = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to result()
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    def settle(self) -> None:
        """Wait, dropping any error (the caller is already failing with its own)."""
        self._thread.join()


@dataclass
class DeployOutcome:
    bundle: Built
    target: str
    root: str
    plan: dict
    applied: dict | None = None
    sent_bytes: int = 0
    upload_bytes: int = 0
    agent_installed: bool = False
    dry_run: bool = False
    seconds: float = 0.0
    events: list[str] = field(default_factory=list)

    @property
    def noop(self) -> bool:
        return not (self.plan["need"] or self.plan["delete"])

    def to_dict(self) -> dict:
        return {"bundle": str(self.bundle.tar_path), "version": self.bundle.manifest.version,
                "content_id": self.bundle.manifest.content_id, "target": self.target,
                "root": self.root, "plan": {k: self.plan[k] for k in
                                            ("added", "changed", "delete", "unchanged")},
                "applied": self.applied, "sent_bytes": self.sent_bytes,
                "agent_installed": self.agent_installed, "dry_run": self.dry_run,
                "noop": self.noop, "seconds": round(self.seconds, 3)}


def state_dir(target: Target) -> str:
    return f"{target.project_root.rstrip('/')}/.remoteops"


def holder(action: str) -> str:
    return f"{action} by {getpass.getuser()}@{socket.gethostname()}"


def get_bundle(settings: Settings, bundle: str | None,
               on_manifest: Callable[[Manifest], None] | None = None) -> Built:
    """The given bundle, verified byte by byte, or a freshly built one."""
    if not bundle:
        return build_bundle(settings, on_manifest=on_manifest)
    tar = Path(bundle).expanduser()
    if tar.suffix == ".json":
        tar = tar.with_name(tar.name.replace(".manifest.json", ".tar.zst"))
    manifest = verify_bundle(tar)
    return Built(tar, manifest_for(tar), manifest, reused=True)


def install_agent(target: Target, built: Built) -> None:
    """Put the bundle's wheel on the server and pip-install it into the target's Python."""
    wheel = built.manifest.toolkit_wheel["name"]
    remote = f"{state_dir(target)}/toolkit/{wheel}"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / wheel
        local.write_bytes(read_member_bytes(built.tar_path, f"toolkit/{wheel}"))
        put_resumable(target, local, remote)
    result = target.run(f"{shell_path(target.python)} -m pip install --disable-pip-version-check "
                        f"-q {shell_path(remote)}", timeout=900, check=False)
    if result.exited != 0:
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["?"]
        raise RemoteOpsError(f"could not install the remoteops agent into {target.python} on "
                             f"{target.name}: {tail[0]}; install it there by hand ("
                             f"{target.python} -m pip install {remote}) or set remote_python.")


def _plan_args(target: Target, remote_manifest: str) -> tuple[str, ...]:
    return ("deploy-plan", "--root", target.project_root, "--manifest", remote_manifest)


_NOT_YET = object()


def _plan(target: Target, built: Built, remote_manifest: str, outcome: DeployOutcome,
          first=_NOT_YET) -> dict:
    """The agent's plan, installing the agent first when it is missing or another version.

    ``first``: the answer of a plan already run (None: the agent was missing).
    """
    args = _plan_args(target, remote_manifest)
    for attempt in range(2):
        if attempt == 0 and first is not _NOT_YET:
            plan = first
        else:
            try:
                plan = target.run_agent(*args)
            except AgentMissing:
                plan = None
        if plan is not None and plan["agent_version"] == built.manifest.toolkit_version:
            return plan
        if attempt:
            break
        found = plan["agent_version"] if plan else "none"
        outcome.events.append(f"installing remoteops {built.manifest.toolkit_version} on "
                              f"{target.name} (found: {found})")
        install_agent(target, built)
        outcome.agent_installed = True
    raise RemoteOpsError(f"the agent on {target.name} still reports another version after "
                         f"installing {built.manifest.toolkit_version}; check remote_python.")


def _connect(target: Target) -> None:
    """Open the SSH connection (no shell, no SFTP yet), so later steps can share it."""
    if isinstance(target, SSHTarget):
        target.connection  # noqa: B018 - opens it


def _send_manifest_and_plan(target: Target, connected: _Background, data: bytes,
                            remote_manifest: str):
    """Upload the manifest while the agent starts (it waits for the file); plan once.

    Returns ``(plan or None when the agent is missing, or _NOT_YET when the plan must
    be run again, e.g. an older agent that does not wait for the manifest)``.
    """
    connected.result()
    agent = _Background(target.run_agent, *_plan_args(target, remote_manifest))
    target.write_bytes(remote_manifest, data)  # on failure the agent gives up by itself
    try:
        return agent.result()
    except AgentMissing:
        return None
    except RemoteCommandError:
        return _NOT_YET  # run it again now that the manifest is surely there


def _upload_file(settings: Settings, built: Built, need: list[str], out_dir: Path,
                 key: str) -> Path:
    """The file to upload: the bundle itself when nearly all of it is needed, else a delta."""
    manifest = built.manifest
    path = out_dir / f"{manifest.project}-{key}.tar.zst"
    sizes = manifest.file_map()
    needed = sum(sizes[p].size for p in need)
    if needed >= WHOLE_BUNDLE_SHARE * max(1, manifest.total_size):
        if not path.is_file():
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(built.tar_path, tmp)
            except OSError:
                shutil.copyfile(built.tar_path, tmp)
            os.replace(tmp, path)
        return path
    return write_delta(built.tar_path, need, path, int(settings["bundle.compression_level"]),
                       manifest=manifest, source_dir=settings.project_dir)


def _record_path(settings: Settings, target: Target) -> Path:
    key = hashlib.sha256(f"{target.kind}\0{target.name}\0{target.project_root}".encode())
    return _bundles_dir(settings) / DEPLOYED_DIR / f"{key.hexdigest()[:32]}.json"


def _recall(settings: Settings, target: Target) -> tuple[Manifest, int] | None:
    """The manifest recorded as deployed on ``target`` and the free bytes it last had."""
    try:
        data = json.loads(_record_path(settings, target).read_text(encoding="utf-8"))
        manifest = load_manifest(Path(data["manifest"]))
        free = int(data.get("free_bytes") or 0)
    except (OSError, ValueError, KeyError, TypeError, BundleError):
        return None
    if manifest.content_id != data.get("content_id") or content_id(
            manifest.files, manifest.toolkit_wheel, manifest.plugins) != manifest.content_id:
        return None
    return manifest, free


def _remember(settings: Settings, target: Target, manifest_path: Path, manifest: Manifest,
              free_bytes: int | None) -> None:
    """Record that ``manifest`` is what ``target`` has deployed now (best effort)."""
    path = _record_path(settings, target)
    record = {"target": target.name, "root": target.project_root,
              "content_id": manifest.content_id, "version": manifest.version,
              "manifest": str(Path(manifest_path).resolve()), "free_bytes": free_bytes}
    try:
        write_atomic_json(path, record, indent=1)
    except OSError:
        pass


def _forget(settings: Settings, target: Target) -> None:
    try:
        _record_path(settings, target).unlink(missing_ok=True)
    except OSError:
        pass


def _note_plan(settings: Settings, target: Target, built: Built,
               recalled: tuple[Manifest, int] | None, plan: dict) -> None:
    """Keep the record in step with what the server's plan says it has deployed."""
    current = plan.get("current_content_id")
    if current == built.manifest.content_id:
        _remember(settings, target, built.manifest_path, built.manifest, plan.get("free_bytes"))
    elif recalled is None or recalled[0].content_id != current:
        _forget(settings, target)


class _FastPath:
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
        self.job: _Background | None = None
        self.args: list[str] = []

    def plan_for(self, manifest: Manifest) -> dict | None:
        """The plan from the recorded base (None: the server must plan, e.g. disk may be short)."""
        if self.manifest is not None and self.manifest.content_id == manifest.content_id:
            return self.plan
        plan = plan_between(self.base, manifest)
        sizes = manifest.file_map()
        if self.free < 2 * sum(sizes[p].size for p in plan["need"]) + HEADROOM:
            plan = None  # maybe short of disk: the server's plan checks before the upload
        else:
            plan.update(free_bytes=self.free, current_version=self.base.version,
                        current_content_id=self.base.content_id,
                        agent_version=manifest.toolkit_version,
                        root=self.target.project_root, recovery_pending=None)
        self.manifest, self.plan, self.job = manifest, plan, None
        return plan

    def start(self, connected: _Background, remote_manifest: str, data: bytes,
              tar: Path | None, progress: Callable[[int, int], None] | None) -> None:
        """Begin in the background; ``tar`` None: the bundle is not written yet."""
        self.job = _Background(self._start, connected, remote_manifest, data, tar, progress)

    def _start(self, connected: _Background, remote_manifest: str, data: bytes,
               tar: Path | None, progress: Callable[[int, int], None] | None):
        manifest, target, need = self.manifest, self.target, self.plan["need"]
        args = ["deploy-apply", "--root", target.project_root, "--manifest", remote_manifest,
                "--holder", holder(f"deploy v{manifest.version}"),
                "--keep", str(int(self.settings["deploy.keep_backups"])),
                "--expect-base", self.base.content_id, "--expect-agent",
                manifest.toolkit_version]
        delta = remote_delta = None
        if need:
            key = hashlib.sha256(json.dumps([manifest.content_id, need]).encode()).hexdigest()[:16]
            out_dir = _bundles_dir(self.settings) / ".delta" if tar is None else \
                tar.parent / ".delta"
            if tar is None:
                delta = _delta_from_sources(self.settings, manifest, need, out_dir, key)
                if delta is None:
                    return None  # needs the bundle's bytes: start again once it is written
            else:
                delta = _upload_file(self.settings, Built(tar, manifest_for(tar), manifest),
                                     need, out_dir, key)
            remote_delta = f"{state_dir(target)}/incoming/{delta.name}"
            args += ["--delta", remote_delta, "--sha256", sha256_file(delta)]
        connected.result()
        # the agent starts (login shell, Python) while the files travel; it waits for them
        self.args = args
        agent = _Background(lambda: target.run_agent(*args, timeout=3600))
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

    def finish(self, outcome: DeployOutcome, remote_manifest: str, data: bytes,
               built: Built, connected: _Background, progress) -> bool:
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
        _remember(self.settings, self.target, built.manifest_path, built.manifest, free_after)
        outcome.applied = None if answer.get("noop") else answer
        return True


def _bundles_dir(settings: Settings) -> Path:
    out = Path(settings["bundle.out_dir"])
    return out if out.is_absolute() else settings.project_dir / out


def _delta_from_sources(settings: Settings, manifest: Manifest, need: list[str], out_dir: Path,
                        key: str) -> Path | None:
    """The delta written from the project's files (None: they no longer match the manifest)."""
    sizes = manifest.file_map()
    if sum(sizes[p].size for p in need) >= WHOLE_BUNDLE_SHARE * max(1, manifest.total_size):
        return None  # the bundle itself is the upload
    if _project_sources(manifest, need, settings.project_dir) is None:
        return None
    try:
        return write_delta(Path(os.devnull), need, out_dir / f"{manifest.project}-{key}.tar.zst",
                           int(settings["bundle.compression_level"]), manifest=manifest,
                           source_dir=settings.project_dir)
    except Exception:  # noqa: BLE001 - a file changed meanwhile: from the bundle, once written
        return None


def deploy(settings: Settings, target: Target, bundle: str | None = None, dry_run: bool = False,
           confirm: Confirm | None = None, progress: Callable[[int, int], None] | None = None,
           on_plan: Callable[[DeployOutcome], None] | None = None) -> DeployOutcome:
    """Deploy a bundle to ``target``: plan, (confirm), upload what differs, apply."""
    started = time.monotonic()
    incoming = f"{state_dir(target)}/incoming"
    recalled = _recall(settings, target)
    fast = _FastPath(settings, target, *recalled) if recalled and not dry_run else None
    connected = _Background(_connect, target)
    early: dict[str, object] = {}

    def on_manifest(manifest: Manifest) -> None:
        remote = f"{incoming}/{manifest.content_id}.manifest.json"
        data = manifest.to_json().encode("utf-8")
        early.update(remote=remote, data=data)
        if fast is None:
            early["job"] = _Background(_send_manifest_and_plan, target, connected, data, remote)
        elif fast.plan_for(manifest) is not None and confirm is None:
            fast.start(connected, remote, data, None, progress)  # while the tar is written

    try:
        built = get_bundle(settings, bundle, on_manifest)
        connected.result()
    except BaseException:
        for job in (connected, early.get("job"), fast and fast.job):
            if job is not None:
                job.settle()
        raise
    manifest = built.manifest
    outcome = DeployOutcome(built, target.name, target.project_root, {}, dry_run=dry_run)
    remote_manifest = f"{incoming}/{manifest.content_id}.manifest.json"
    if early.get("remote") == remote_manifest:
        data = early["data"]
        job = early.get("job")
    else:
        for old in (early.get("job"), fast and fast.job):
            if old is not None:
                old.settle()
        data = built.manifest_path.read_bytes()
        job = None
    first = _NOT_YET
    if fast is not None and fast.plan_for(manifest) is not None:
        outcome.plan = fast.plan
        if on_plan is not None:
            on_plan(outcome)
        if not outcome.noop and confirm is not None and not confirm(outcome.plan):
            raise RemoteOpsError("deploy cancelled; nothing was changed.")
        try:
            done = fast.finish(outcome, remote_manifest, data, built, connected, progress)
        except BaseException:
            if fast.job is not None:
                fast.job.settle()
            raise
        if done:
            outcome.seconds = time.monotonic() - started
            return outcome
        outcome.upload_bytes = 0
    elif job is not None:
        first = job.result()
        outcome.sent_bytes += len(data)
    else:
        target.write_bytes(remote_manifest, data)
        outcome.sent_bytes += len(data)
    outcome.plan = _plan(target, built, remote_manifest, outcome, first)
    _note_plan(settings, target, built, recalled, outcome.plan)
    if on_plan is not None:
        on_plan(outcome)
    if dry_run or outcome.noop:
        outcome.seconds = time.monotonic() - started
        return outcome
    if confirm is not None and not confirm(outcome.plan):
        raise RemoteOpsError("deploy cancelled; nothing was changed.")
    need = outcome.plan["need"]
    remote_delta = None
    digest = None
    if need:
        key = hashlib.sha256(json.dumps([manifest.content_id, need]).encode()).hexdigest()[:16]
        out_dir = built.tar_path.parent / ".delta"
        delta = _upload_file(settings, built, need, out_dir, key)
        outcome.upload_bytes = delta.stat().st_size
        # the upload, then its files uncompressed (staged) and the backups: a compressible
        # bundle needs far more than it sends
        sizes = manifest.file_map()
        needs = (outcome.upload_bytes + outcome.plan.get("backup_bytes", 0) + (16 << 20)
                 + outcome.plan.get("need_bytes", sum(sizes[p].size for p in need)))
        if outcome.plan["free_bytes"] < needs:
            raise RemoteOpsError(
                f"not enough disk on {target.name}: {outcome.plan['free_bytes'] / 1e9:.2f} GB "
                f"free, the deploy needs {needs / 1e9:.2f} GB (upload, files uncompressed and "
                "backups); free space there and deploy again. Nothing was changed.")
        remote_delta = f"{incoming}/{delta.name}"
        hashing = _Background(sha256_file, delta)  # overlaps the upload
        try:
            outcome.sent_bytes += put_resumable(target, delta, remote_delta, progress)
        finally:
            hashing.settle()
        digest = hashing.result()
    args = ["deploy-apply", "--root", target.project_root, "--manifest", remote_manifest,
            "--holder", holder(f"deploy v{manifest.version}"),
            "--keep", str(int(settings["deploy.keep_backups"]))]
    if remote_delta:
        args += ["--delta", remote_delta, "--sha256", digest]
    applied = target.run_agent(*args, timeout=3600)
    free_after = applied.pop("free_bytes", None)
    outcome.applied = applied
    _remember(settings, target, built.manifest_path, manifest, free_after)
    outcome.seconds = time.monotonic() - started
    return outcome


def rollback(settings: Settings, target: Target, backup: str, dry_run: bool = False,
             confirm: Confirm | None = None) -> dict:
    args = ["rollback", "--root", target.project_root, "--backup", backup]
    try:
        plan = target.run_agent(*args, "--dry-run")
        if dry_run:
            return {"dry_run": True, **plan}
        if confirm is not None and not confirm(plan):
            raise RemoteOpsError("rollback cancelled; nothing was changed.")
        _forget(settings, target)  # what is deployed there changes: plan there next time
        return target.run_agent(*args, "--holder", holder("rollback"), "--keep",
                                str(int(settings["deploy.keep_backups"])), timeout=3600)
    except AgentMissing:
        raise RemoteOpsError(f"remoteops is not installed on {target.name}, so nothing was "
                             "deployed there yet; there is nothing to roll back.") from None


def list_backups(target: Target) -> list[dict]:
    try:
        return target.run_agent("backups", "--root", target.project_root)["backups"]
    except AgentMissing:
        return []


__all__ = ["deploy", "rollback", "list_backups", "DeployOutcome"]
