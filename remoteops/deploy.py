"""Laptop side of deploys: plan against the server, upload what differs, apply, roll back.

The heavy lifting runs on the server in one agent command each (plan, apply,
rollback), never file by file over SSH. The agent is installed from the
bundle's own wheel when it is missing or its version differs.

What waits on the network overlaps with local work: the SSH connection opens
while the bundle is hashed; the manifest upload and the plan run while the tar
is compressed; the agent starts while the manifest is still being sent (it
waits for the file). When (nearly) every file is needed, the bundle itself is
the upload, so nothing is compressed twice.
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

from remoteops.bundles import (Built, Manifest, build_bundle, manifest_for,
                               read_member_bytes, sha256_file, verify_bundle, write_delta)
from remoteops.config import Settings
from remoteops.errors import RemoteCommandError, RemoteOpsError
from remoteops.targets import AgentMissing, SSHTarget, Target, shell_path
from remoteops.transfer import put_resumable

Confirm = Callable[[dict], bool]
# Upload the bundle itself rather than a delta when the plan needs this share of its bytes.
WHOLE_BUNDLE_SHARE = 0.9


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


def deploy(settings: Settings, target: Target, bundle: str | None = None, dry_run: bool = False,
           confirm: Confirm | None = None, progress: Callable[[int, int], None] | None = None,
           on_plan: Callable[[DeployOutcome], None] | None = None) -> DeployOutcome:
    """Deploy a bundle to ``target``: plan, (confirm), upload what differs, apply."""
    started = time.monotonic()
    incoming = f"{state_dir(target)}/incoming"
    connected = _Background(_connect, target)
    early: dict[str, object] = {}

    def on_manifest(manifest: Manifest) -> None:
        remote = f"{incoming}/{manifest.content_id}.manifest.json"
        data = manifest.to_json().encode("utf-8")
        early.update(remote=remote, data=data, job=_Background(
            _send_manifest_and_plan, target, connected, data, remote))

    try:
        built = get_bundle(settings, bundle, on_manifest)
        connected.result()
    except BaseException:
        for job in (connected, early.get("job")):
            if job is not None:
                job.settle()
        raise
    manifest = built.manifest
    outcome = DeployOutcome(built, target.name, target.project_root, {}, dry_run=dry_run)
    remote_manifest = f"{incoming}/{manifest.content_id}.manifest.json"
    if early.get("remote") == remote_manifest:
        data = early["data"]
        first = early["job"].result()
    else:
        if early.get("job") is not None:
            early["job"].settle()
        data = built.manifest_path.read_bytes()
        target.write_bytes(remote_manifest, data)
        first = _NOT_YET
    outcome.sent_bytes += len(data)
    outcome.plan = _plan(target, built, remote_manifest, outcome, first)
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
        if outcome.plan["free_bytes"] < 2 * outcome.upload_bytes + (16 << 20):
            raise RemoteOpsError(
                f"not enough disk on {target.name}: {outcome.plan['free_bytes'] / 1e9:.2f} GB "
                f"free, the upload needs {2 * outcome.upload_bytes / 1e9:.2f} GB; free space "
                "there and deploy again. Nothing was changed.")
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
    outcome.applied = target.run_agent(*args, timeout=3600)
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
