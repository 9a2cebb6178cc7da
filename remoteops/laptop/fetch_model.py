"""``fetch-model``: put ``train.base_model`` on the server.

- A hub id (Hugging Face, a mirror through the server's ``HF_ENDPOINT``, or ModelScope) is
  downloaded by the server itself (``remoteops-agent fetch-model``, detached, resumable,
  verified); the laptop follows its progress. Ctrl-C only stops following.
- ``--from-laptop`` (and always for a folder) uploads this laptop's copy: the server says
  which files it lacks or holds differently (by sha256), the laptop sends those through
  ``laptop/transfer.put_resumable`` (a cut connection resumes where it stopped) and the
  server hashes each one before moving it into place.

``remote-train`` calls ``ensure_on_server`` before it starts a run: a folder that is on this
laptop and not (completely) on the server is uploaded the same way, so the demo, whose
model lives in ``outputs/`` (never shipped by a deploy), trains on a server as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from remoteops.common import model_ref
from remoteops.common.config import Settings
from remoteops.common.errors import ConfigError, RemoteOpsError
from remoteops.common.sizes import human_size
from remoteops.common.target import Target
from remoteops.laptop.collect import in_place
from remoteops.laptop.transfer import put_resumable

Say = Callable[[str], None]
Progress = Callable[[int, int], None]


def laptop_ref(settings: Settings) -> model_ref.ModelRef:
    try:
        return model_ref.choose(model_ref.parse(settings["train.base_model"]),
                                settings.project_dir)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def laptop_copy(settings: Settings, ref: model_ref.ModelRef,
                source: str | None = None) -> Path | None:
    """This laptop's copy: ``source``, the folder itself, or the hub cache's snapshot."""
    if source:
        path = Path(source).expanduser().resolve()
        if not path.is_dir():
            raise RemoteOpsError(f"--source {source} is not a folder.")
        return path
    folder = model_ref.model_folder(ref, settings.project_dir, os.environ)
    return Path(folder) if folder and os.path.isdir(folder) else None


def _snapshot(ref: model_ref.ModelRef, folder: Path, files: dict) -> str | None:
    """The Hugging Face snapshot name the server's cache gets: the laptop's own (a commit
    hash), or one made from the content for a copy from elsewhere."""
    if ref.kind != "hf":
        return None
    if folder.parent.name == "snapshots" and model_ref.REVISION.fullmatch(folder.name):
        return folder.name
    return hashlib.sha1(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _hashes(settings: Settings):
    from remoteops.laptop.build import HashCache

    (settings.project_dir / ".remoteops").mkdir(exist_ok=True)
    return HashCache(settings.project_dir / ".remoteops" / "model-hashes.json")


def upload(settings: Settings, target: Target, ref: model_ref.ModelRef, folder: Path,
           quick: bool = False, progress: Progress | None = None, say: Say | None = None) -> dict:
    """Send what the server lacks of ``folder`` (by size when ``quick``, else by sha256)."""
    started = time.monotonic()
    report = model_ref.inspect_folder(str(folder))
    if report["problems"]:
        raise RemoteOpsError(f"the copy on this laptop ({folder}) is incomplete: "
                             f"{'; '.join(report['problems'])}; complete it before uploading.")
    sizes = model_ref.model_files(str(folder))
    cache = _hashes(settings)

    def sha(rel: str) -> str:
        path = folder / rel
        return cache.sha256(str(path.resolve()), path, path.stat())

    files = {rel: [size, None if quick else sha(rel)] for rel, size in sizes.items()}
    cache.save()
    snapshot = _snapshot(ref, folder, {r: s for r, s in sizes.items()})
    manifest = {"ref": ref.canonical(), "snapshot": snapshot, "quick": quick, "files": files}
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    remote_manifest = f"{target.project_root.rstrip('/')}/.remoteops/incoming/model-{key}.json"
    target.write_bytes(remote_manifest, json.dumps(manifest).encode())
    args = ("model-receive", "--root", target.project_root, "--manifest", remote_manifest)
    plan = target.run_agent(*args, timeout=3600)
    result = {"ref": ref.shown(), "mode": "upload", "source": str(folder),
              "dest": plan["dest"], "files": len(files), "bytes": report["bytes"],
              "sent": [], "sent_bytes": 0, "verified": True}
    need = plan["need"]
    if not need:
        target.remove(remote_manifest)
        result["seconds"] = round(time.monotonic() - started, 2)
        return result
    for rel in need:
        if files[rel][1] is None:
            files[rel][1] = sha(rel)
    cache.save()
    total = sum(files[r][0] for r in need)
    if plan["free_bytes"] < total + (64 << 20):
        raise RemoteOpsError(f"not enough disk on {target.name}: {human_size(plan['free_bytes'])} "
                             f"free at {plan['free_at']}, the model needs {human_size(total)} more; "
                             "free space there and run fetch-model again.")
    if say:
        say(f"{ref.shown()}: uploading {len(need)} file(s), {human_size(total)}, to "
            f"{target.name}:{plan['dest']}")
    done = 0
    for rel in need:
        size, digest = files[rel]
        remote = f"{plan['incoming']}/{digest}"
        if target.size(remote) != size:  # not already sent (a resumed run, a duplicate file)
            base = done
            result["sent_bytes"] += put_resumable(
                target, folder / rel, remote,
                (lambda d, t, base=base: progress(base + d, total)) if progress else None)
        done += size
        result["sent"].append(rel)
    manifest["need"] = need
    target.write_bytes(remote_manifest, json.dumps(manifest).encode())
    committed = target.run_agent(*args, "--commit", timeout=3600)
    if committed["problems"]:
        raise RemoteOpsError(f"{ref.shown()} on {target.name} is still incomplete after the upload: "
                             f"{'; '.join(committed['problems'])}.")
    result["seconds"] = round(time.monotonic() - started, 2)
    return result


def download_on_server(target: Target, ref: model_ref.ModelRef, show: Say | None = None,
                       poll: float = 1.0) -> dict:
    """Start (or rejoin) the server's own download and follow it to its end."""
    args = ("fetch-model", "--root", target.project_root)
    state = target.run_agent(*args, "--ref", ref.canonical(), "--host-label", target.describe(),
                             timeout=120)
    last, shown_at = "", 0.0
    try:
        while state["status"] in ("starting", "running"):
            line = _progress_line(state)
            # a new message at once; byte counts every 10 s (a log, not a flood)
            if show and line != last and (line.split(":")[0] != last.split(":")[0]
                                          or time.monotonic() - shown_at >= 10):
                show(line)
                last, shown_at = line, time.monotonic()
            time.sleep(poll)
            state = target.run_agent(*args, "--status")
    except KeyboardInterrupt:
        return {"ref": ref.shown(), "mode": "download", "detached": True}
    if state["status"] != "done":
        raise RemoteOpsError(state.get("message") or f"the download is {state['status']}")
    return {"ref": ref.shown(), "mode": "download", "dest": state.get("path"),
            "files": state.get("files"), "bytes": state.get("done_bytes"),
            "already": state.get("already", False), "verified": True, "sent_bytes": 0}


def _progress_line(state: dict) -> str:
    done, total = state.get("done_bytes") or 0, state.get("total_bytes")
    if done:
        share = f" ({100 * done / total:.0f}%)" if total else ""
        return (f"downloading on the server: {human_size(done)}"
                + (f" of {human_size(total)}{share}" if total else ""))
    return f"server: {state.get('message', '')}"


def fetch_model(settings: Settings, target: Target, from_laptop: bool = False,
                source: str | None = None, progress: Progress | None = None,
                say: Say | None = None) -> dict:
    """``invoke fetch-model``: download on the server, or upload this laptop's copy."""
    ref = laptop_ref(settings)
    if not from_laptop and ref.kind != "local" and not source:
        return download_on_server(target, ref, say)
    folder = laptop_copy(settings, ref, source)
    if folder is None:
        where = (model_ref.local_folder(ref, settings.project_dir) if ref.kind == "local" else
                 f"this laptop's {'Hugging Face' if ref.kind == 'hf' else 'ModelScope'} cache")
        raise RemoteOpsError(f"there is no copy of {ref.shown()} on this laptop ({where}); "
                             "download it here first, or name it with --source FOLDER.")
    if in_place(target, settings.project_dir) and ref.kind == "local" and not source:
        report = model_ref.inspect_folder(str(folder))
        if report["problems"]:
            raise RemoteOpsError(f"{folder} is incomplete: {'; '.join(report['problems'])}.")
        return {"ref": ref.shown(), "mode": "in place", "dest": str(folder),
                "files": report["files"], "bytes": report["bytes"], "sent": [],
                "sent_bytes": 0, "verified": False}
    return upload(settings, target, ref, folder, quick=False, progress=progress, say=say)


def ensure_on_server(settings: Settings, target: Target, progress: Progress | None = None,
                     say: Say | None = None) -> dict | None:
    """Before a run: upload a base-model folder that this laptop has and the server lacks
    (checked by size; every sent file is verified by sha256). Anything else is left to the
    precheck stage."""
    if in_place(target, settings.project_dir):
        return None
    try:
        ref = laptop_ref(settings)
    except ConfigError:
        return None
    folder = laptop_copy(settings, ref) if ref.kind == "local" else None
    if folder is None or model_ref.inspect_folder(str(folder))["problems"]:
        return None
    return upload(settings, target, ref, folder, quick=True, progress=progress, say=say)


def describe(result: dict) -> str:
    """One line for people."""
    if result["mode"] == "in place":
        return f"{result['ref']}: {result['dest']} is the server's own folder (local target)"
    if result.get("detached"):
        return (f"{result['ref']}: detached (Ctrl-C); the download goes on on the server. Run "
                "the same command again to follow it")
    if result["mode"] == "download":
        how = "already in the cache" if result.get("already") else "downloaded"
        return (f"{result['ref']}: {how} on the server: {result['files']} files, "
                f"{human_size(result['bytes'])} in {result['dest']} (sha256 verified)")
    if not result["sent"]:
        return (f"{result['ref']}: the server already has all {result['files']} files "
                f"({human_size(result['bytes'])}) in {result['dest']}; nothing sent")
    return (f"{result['ref']}: sent {len(result['sent'])} of {result['files']} files "
            f"({human_size(result['sent_bytes'])} this time) to {result['dest']} in "
            f"{result['seconds']:.1f}s; sha256 verified on the server")


__all__ = ["fetch_model", "ensure_on_server", "upload", "download_on_server", "laptop_ref",
           "laptop_copy", "describe"]
