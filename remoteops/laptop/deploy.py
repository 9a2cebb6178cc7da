"""Laptop side of deploys: plan against the server, upload what differs, apply, roll back.

The heavy lifting runs on the server in one agent command each (plan, apply,
rollback), never file by file over SSH. The agent is installed from the
bundle's own wheel when it is missing or its version differs.

What waits on the network overlaps with local work: the SSH connection opens
while the bundle is hashed; the manifest upload and the plan run while the tar
is compressed; the agent starts while the manifest is still being sent (it
waits for the file). When (nearly) every file is needed, the bundle itself is
the upload, so nothing is compressed twice. A first bundle bound for an empty root
does not wait for the plan at all: it is sent as it is written, its manifest after it
(``deploy_first``).

Fast path (``deploy_stream``, over ``deploy_fast``'s plan): after a deploy the laptop
plans locally against its record of the server (``deploy_record``) and sends the
manifest delta and the changed files on the stdin of one agent command. Dry runs
always plan on the server. Shared pieces live in ``deploy_common``.
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path
from typing import Callable

from remoteops.common.config import Settings
from remoteops.common.errors import RemoteCommandError, RemoteOpsError
from remoteops.common.files import sha256_file
from remoteops.common.manifest import (DISK_HEADROOM, Manifest, manifest_for, read_member_bytes,
                                       verify_bundle)
from remoteops.laptop.build import Built, build_bundle
from remoteops.laptop.background import Background
from remoteops.laptop.deploy_first import FirstStream
from remoteops.laptop.deploy_common import (Confirm, DeployOutcome, apply_args, delta_key, holder,
                                            state_dir, upload_file)
from remoteops.laptop.agent_stream import STDIN_EVENT, can_stream
from remoteops.laptop.deploy_fast import FastPath
from remoteops.laptop.deploy_full import (TarTap, file_ranges, open_request, send_tar,
                                          wants_whole_bundle)
from remoteops.laptop.deploy_planned import Planned
from remoteops.laptop.deploy_stream import StreamPath
from remoteops.laptop.deploy_record import forget, note_plan, recall, remember
from remoteops.common.target import AgentMissing, Target, shell_path
from remoteops.laptop.targets import SSHTarget
from remoteops.laptop.transfer import put_resumable


def get_bundle(settings: Settings, bundle: str | None,
               on_manifest: Callable[[Manifest], None] | None = None,
               background: bool | str = False, tap: TarTap | None = None,
               on_first: Callable[[int], None] | None = None) -> Built:
    """The given bundle, verified byte by byte, or a freshly built one (``background``: its
    tar still being written, see ``build_bundle``)."""
    if not bundle:
        return build_bundle(settings, on_manifest=on_manifest, background=background, tap=tap,
                            on_first=on_first)
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
        built.wait()  # the wheel is in the tar
        found = plan["agent_version"] if plan else "none"
        outcome.events.append(f"installing remoteops {built.manifest.toolkit_version} on "
                              f"{target.name} (found: {found})")
        install_agent(target, built)
        outcome.agent_installed = True
    raise RemoteOpsError(f"the agent on {target.name} still reports another version after "
                         f"installing {built.manifest.toolkit_version}; check remote_python.")


def _connect(target: Target, streamed: bool = False) -> None:
    """Open the SSH connection (no shell, no SFTP yet), so later steps can share it; not
    when the deploy streams over the ``ssh`` client or a kept connection (paramiko then
    opens only if needed)."""
    if isinstance(target, SSHTarget) and not (streamed and (
            target.openssh is not None or (target.kept is not None and target.kept.ready()))):
        target.connection  # noqa: B018 - opens it


def _send_manifest_and_plan(target: Target, connected: Background, data: bytes,
                            remote_manifest: str):
    """Upload the manifest while the agent starts (it waits for the file); plan once.

    Returns ``(plan or None when the agent is missing, or _NOT_YET when the plan must
    be run again, e.g. an older agent that does not wait for the manifest)``.
    """
    connected.result()
    agent = Background(target.run_agent, *_plan_args(target, remote_manifest))
    target.write_bytes(remote_manifest, data)  # on failure the agent gives up by itself
    try:
        return agent.result()
    except AgentMissing:
        return None
    except RemoteCommandError:
        return _NOT_YET  # run it again now that the manifest is surely there


def deploy(settings: Settings, target: Target, bundle: str | None = None, dry_run: bool = False,
           confirm: Confirm | None = None, progress: Callable[[int, int], None] | None = None,
           on_plan: Callable[[DeployOutcome], None] | None = None,
           local_later: bool = False) -> DeployOutcome:
    """Deploy a bundle to ``target``: plan, (confirm), upload what differs, apply.

    ``local_later``: a streamed redeploy's local tar, written after the command where it
    can be (``_wait_local``), is left to the caller (``outcome.finish_local``), to run
    once the target is closed: a paramiko connection's thread rules out writing it in a
    forked child, and writing it here made a redeploy over a fresh login ~0.15 s longer."""
    started = time.monotonic()
    incoming = f"{state_dir(target)}/incoming"
    recalled = recall(settings, target)
    path = StreamPath if can_stream(target) else FastPath
    fast = path(settings, target, *recalled) if recalled and not dry_run else None
    tap = TarTap() if fast is None and not dry_run and not bundle and can_stream(target) \
        else None
    if tap is not None and isinstance(target, SSHTarget):
        target.prefer_openssh()  # the whole bundle streams
    connected = Background(_connect, target, isinstance(fast, StreamPath) or tap is not None)
    if isinstance(fast, StreamPath) and confirm is None:
        fast.prestart(connected)
    early: dict[str, object] = {}
    # without a record one deploy-stream request plans and applies; it starts with the
    # connection, so its Python starts while the laptop hashes
    planned = Planned(settings, target, open_request(target, connected)) if tap else None
    # a first bundle's tar goes before its manifest when the root is empty (deploy_first)
    ahead = FirstStream(settings, target, planned, tap, progress) \
        if planned is not None and confirm is None else None

    def on_manifest(manifest: Manifest) -> None:
        remote = f"{incoming}/{manifest.content_id}.manifest.json"
        # a streamed redeploy sends no whole manifest (its fallbacks make it when needed)
        data = None if isinstance(fast, StreamPath) else manifest.to_json().encode("utf-8")
        early.update(remote=remote, data=data)
        if ahead is not None:
            ahead.manifest(manifest)  # after the tar, or for the plan (the root not empty)
        elif planned is not None:
            planned.ask(manifest)  # the manifest on the request's stdin, for the server's plan
        elif fast is None:
            early["job"] = Background(_send_manifest_and_plan, target, connected, data, remote)
        elif fast.plan_for(manifest) is not None and confirm is None:
            fast.start(connected, remote, data, None, progress)  # while the tar is written

    try:
        # a streamed deploy goes ahead while the tar is written (a full one sends it meanwhile)
        # a streamed redeploy needs no tar: it is written when needed, or after the command
        built = get_bundle(settings, bundle, on_manifest, tap=tap,
                           background="deferred" if isinstance(fast, StreamPath)
                           else tap is not None,
                           on_first=ahead.start if ahead is not None else None)
        connected.result()
    except BaseException:
        for job in (connected, early.get("job")):
            if job is not None:
                job.settle()
        if fast is not None:
            fast.cancel()
        if ahead is not None:
            ahead.cancel()
        elif planned is not None:
            planned.cancel()
        raise
    try:
        manifest = built.manifest
        outcome = DeployOutcome(built, target.name, target.project_root, {}, dry_run=dry_run)
        remote_manifest = f"{incoming}/{manifest.content_id}.manifest.json"
        if early.get("remote") == remote_manifest:
            data = early["data"]
            job = early.get("job")
        else:
            if early.get("job") is not None:
                early["job"].settle()
            if fast is not None:
                fast.cancel()
            data = manifest.to_json().encode("utf-8")
            job = None
        first = _NOT_YET
        if data is None and (fast is None or fast.plan_for(manifest) is None):
            data = manifest.to_json().encode("utf-8")
        fell_back = False  # the record's plan was tried: what it left is handled below
        if fast is not None and fast.plan_for(manifest) is not None:
            outcome.plan = fast.plan
            if on_plan is not None:
                on_plan(outcome)
            if not outcome.noop and confirm is not None and not confirm(outcome.plan):
                raise RemoteOpsError("deploy cancelled; nothing was changed.")
            try:
                done = fast.finish(outcome, remote_manifest, data, built, connected, progress)
            except BaseException:
                fast.cancel()
                raise
            if done:
                if local_later:
                    outcome.finish_local = functools.partial(_wait_local, settings, target,
                                                             built, outcome)
                else:
                    _wait_local(settings, target, built, outcome)
                outcome.seconds = time.monotonic() - started
                return outcome
            outcome.upload_bytes = 0
            if getattr(fast, "replan", False):  # not as recorded: it plans on a request,
                tap = built.tap = TarTap()  # and the tar streams as it is written
                planned = Planned(settings, target, open_request(target, connected))
                planned.ask(manifest)
            built.start_pending()  # the usual path needs the tar: write it while it plans
            fell_back = True
        if ahead is not None:
            try:
                how = ahead.how()
                if how == "stream":
                    planned = None  # its request is the stream's: finished or cancelled there
                    return _first_streamed(settings, target, built, ahead, outcome, recalled,
                                           on_plan, started)
            except BaseException:
                ahead.cancel()
                raise
            outcome.sent_bytes += ahead.sent
            if how == "old":  # the agent ended the request: plan on a new one
                planned = Planned(settings, target, open_request(target, connected))
                planned.ask(manifest)
        if planned is not None:
            first = planned.plan(manifest.toolkit_version)
            if first is None:  # the usual path: the manifest by SFTP, the agent installed
                planned = None
                data = data or manifest.to_json().encode("utf-8")
                target.write_bytes(remote_manifest, data)
                outcome.sent_bytes += len(data)
                first = _NOT_YET
            else:
                outcome.sent_bytes += planned.sent
        elif fell_back:
            pass  # the manifest is on the server: the plan below reads it
        elif job is not None:
            first = job.result()
            outcome.sent_bytes += len(data)
        else:
            if fast is not None:
                fast.cancel()  # the record's plan is not used (the disk may be short)
            target.write_bytes(remote_manifest, data)
            outcome.sent_bytes += len(data)
        outcome.plan = _plan(target, built, remote_manifest, outcome, first)
        note_plan(settings, target, built, recalled, outcome.plan)
        if on_plan is not None:
            on_plan(outcome)
        if dry_run or outcome.noop:
            if planned is not None:
                planned.skip()
            outcome.seconds = time.monotonic() - started
            return outcome
        if confirm is not None and not confirm(outcome.plan):
            raise RemoteOpsError("deploy cancelled; nothing was changed.")
        need = outcome.plan["need"]
        sent = None
        if need and tap is not None:  # the files on a deploy-stream request's stdin
            applied = _stream_planned(settings, target, built, tap, outcome, progress, planned)
            planned = None
            if applied is not None:
                return _applied(settings, target, built, outcome, applied, started)
            outcome.events.append(STDIN_EVENT)
        built.wait()  # what follows reads the tar
        if need:
            delta = upload_file(settings, built, need, built.tar_path.parent / ".delta",
                                delta_key(manifest, need))
            outcome.upload_bytes = delta.stat().st_size
            sizes = manifest.file_map()
            _check_disk(target, outcome.plan, outcome.upload_bytes + outcome.plan.get(
                "need_bytes", sum(sizes[p].size for p in need)))
            remote_delta = f"{incoming}/{delta.name}"
            hashing = Background(sha256_file, delta)  # overlaps the upload
            try:
                outcome.sent_bytes += put_resumable(target, delta, remote_delta, progress)
            finally:
                hashing.settle()
            sent = (remote_delta, hashing.result())
        args = apply_args(settings, target, manifest, remote_manifest, sent)
        return _applied(settings, target, built, outcome,
                        target.run_agent(*args, timeout=3600), started)
    finally:
        if planned is not None:
            planned.cancel()
        if built.pending is not None:  # never leave the tar half-written behind
            built.pending.join()


def _stream_planned(settings: Settings, target: Target, built: Built, tap: TarTap,
                    outcome: DeployOutcome, progress, planned: Planned | None) -> dict | None:
    """The server's plan applied through ``deploy-stream``: the bundle as it is written
    when (nearly) all of it is needed, else a delta (None: the agent could not read it)."""
    need, parts = outcome.plan["need"], outcome.plan.get("stream_parts") or {}
    if wants_whole_bundle(built, need):
        _check_disk(target, outcome.plan, 2 * outcome.plan["need_bytes"])
        # the name carries what the bytes depend on besides the content: a cut upload is
        # resumed only by the same bytes
        name = f"whole-{int(settings['bundle.compression_level'])}"
        size = built.manifest.total_size
        offset = int(parts.get(name) or 0)
        chunks = tap.ranges(built, offset)
    else:
        built.wait()
        key = delta_key(built.manifest, need)
        delta = upload_file(settings, built, need, built.tar_path.parent / ".delta", key)
        _check_disk(target, outcome.plan, delta.stat().st_size + outcome.plan["need_bytes"])
        name, size = f"delta-{key}", delta.stat().st_size
        offset = int(parts.get(name) or 0)
        chunks = file_ranges(delta, offset)
    if planned is not None:  # the request that planned waits for these files
        applied, sent = planned.send(built, chunks, name, offset, progress, size)
    else:
        applied, sent = send_tar(settings, target, built, chunks, name, offset, progress, size)
    outcome.sent_bytes += sent
    outcome.upload_bytes = built.tar_path.stat().st_size if name.startswith("whole") else size
    return applied


def _first_streamed(settings: Settings, target: Target, built: Built, ahead: FirstStream,
                    outcome: DeployOutcome, recalled, on_plan, started: float) -> DeployOutcome:
    """A first bundle's tar, sent before its manifest to an empty root: the server's plan
    shown, the go-ahead once the tar is complete (``deploy_first``)."""
    outcome.plan = ahead.plan()
    note_plan(settings, target, built, recalled, outcome.plan)
    if on_plan is not None:
        on_plan(outcome)
    applied = ahead.finish(built)
    outcome.sent_bytes += ahead.sent
    outcome.upload_bytes = ahead.upload
    return _applied(settings, target, built, outcome, applied, started)


def _check_disk(target: Target, plan: dict, upload_and_files: int) -> None:
    """The upload, then its files uncompressed (staged) and the backups: a compressible
    bundle needs far more than it sends."""
    needs = upload_and_files + plan.get("backup_bytes", 0) + DISK_HEADROOM
    if plan["free_bytes"] < needs:
        raise RemoteOpsError(
            f"not enough disk on {target.name}: {plan['free_bytes'] / 1e9:.2f} GB free, the "
            f"deploy needs {needs / 1e9:.2f} GB (upload, files uncompressed and backups); free "
            "space there and deploy again. Nothing was changed.")


def _applied(settings: Settings, target: Target, built: Built, outcome: DeployOutcome,
             applied: dict, started: float) -> DeployOutcome:
    free_after = applied.pop("free_bytes", None)
    outcome.applied = applied
    remember(settings, target, built.manifest_path, built.manifest, free_after)
    outcome.seconds = time.monotonic() - started
    return outcome


def _wait_local(settings: Settings, target: Target, built: Built,
                outcome: DeployOutcome) -> None:
    """The local tar of a deploy already applied: written after the command when it can be
    (``Built.finish_detached``); its failure is told, not raised."""
    try:
        if not built.finish_detached():
            built.wait()
    except Exception as exc:  # noqa: BLE001 - the server has the new version already
        forget(settings, target)
        outcome.events.append(f"deployed, but the local bundle could not be written ({exc}); "
                              "the next deploy plans against the server")


def rollback(settings: Settings, target: Target, backup: str, dry_run: bool = False,
             confirm: Confirm | None = None) -> dict:
    args = ["rollback", "--root", target.project_root, "--backup", backup]
    try:
        plan = target.run_agent(*args, "--dry-run")
        if dry_run:
            return {"dry_run": True, **plan}
        if confirm is not None and not confirm(plan):
            raise RemoteOpsError("rollback cancelled; nothing was changed.")
        forget(settings, target)  # what is deployed there changes: plan there next time
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
