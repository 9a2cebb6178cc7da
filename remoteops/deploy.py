"""Laptop side of deploys: plan against the server, upload what differs, apply, roll back.

The heavy lifting runs on the server in one agent command each (plan, apply,
rollback), never file by file over SSH. The agent is installed from the
bundle's own wheel when it is missing or its version differs.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from remoteops.bundles import (Built, build_bundle, manifest_for,
                               read_member_bytes, sha256_file, verify_bundle, write_delta)
from remoteops.config import Settings
from remoteops.errors import RemoteOpsError
from remoteops.targets import AgentMissing, Target, shell_path
from remoteops.transfer import put_resumable

Confirm = Callable[[dict], bool]


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


def get_bundle(settings: Settings, bundle: str | None) -> Built:
    """The given bundle, verified byte by byte, or a freshly built one."""
    if not bundle:
        return build_bundle(settings)
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


def _plan(target: Target, built: Built, remote_manifest: str, outcome: DeployOutcome) -> dict:
    args = ("deploy-plan", "--root", target.project_root, "--manifest", remote_manifest)
    for attempt in range(2):
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


def deploy(settings: Settings, target: Target, bundle: str | None = None, dry_run: bool = False,
           confirm: Confirm | None = None, progress: Callable[[int, int], None] | None = None,
           on_plan: Callable[[DeployOutcome], None] | None = None) -> DeployOutcome:
    """Deploy a bundle to ``target``: plan, (confirm), upload what differs, apply."""
    started = time.monotonic()
    built = get_bundle(settings, bundle)
    manifest = built.manifest
    outcome = DeployOutcome(built, target.name, target.project_root, {}, dry_run=dry_run)
    incoming = f"{state_dir(target)}/incoming"
    remote_manifest = f"{incoming}/{manifest.content_id}.manifest.json"
    data = built.manifest_path.read_bytes()
    target.write_bytes(remote_manifest, data)
    outcome.sent_bytes += len(data)
    outcome.plan = _plan(target, built, remote_manifest, outcome)
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
        delta = write_delta(built.tar_path, need, out_dir / f"{manifest.project}-{key}.tar.zst",
                            int(settings["bundle.compression_level"]))
        outcome.upload_bytes = delta.stat().st_size
        if outcome.plan["free_bytes"] < 2 * outcome.upload_bytes + (16 << 20):
            raise RemoteOpsError(
                f"not enough disk on {target.name}: {outcome.plan['free_bytes'] / 1e9:.2f} GB "
                f"free, the upload needs {2 * outcome.upload_bytes / 1e9:.2f} GB; free space "
                "there and deploy again. Nothing was changed.")
        remote_delta = f"{incoming}/{delta.name}"
        outcome.sent_bytes += put_resumable(target, delta, remote_delta, progress)
        digest = sha256_file(delta)
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
