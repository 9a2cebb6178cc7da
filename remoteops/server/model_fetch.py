"""The base model on the server: download it from a hub, or receive the laptop's copy.

**Download** (``fetch-model``): a Hugging Face id through ``huggingface_hub.snapshot_download``
(``HF_ENDPOINT``, ``HF_HOME``, ``HF_TOKEN`` as the server's environment sets them), a ModelScope
id through ``modelscope.snapshot_download``. Both resume what an earlier try left. Runs
detached (the laptop may go away); ``<root>/.remoteops/model-fetch.json`` holds its progress
(bytes on disk against the hub's file list, the speed) and its end, ``model-fetch.log`` its
output; ``progress_status`` reads it for ``pipeline-status`` (the laptop's ``status``).
Afterwards every Hugging Face blob named by a sha256 is hashed against its name, and the
folder must be complete (``model_ref.inspect_folder``).

The laptop's copy arriving instead (``model-receive``) is ``server/model_receive``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from remoteops.common import model_ref
from remoteops.common.clock import now_iso
from remoteops.common.errors import ConfigError, RemoteOpsError
from remoteops.common.files import sha256_file, write_atomic_json
from remoteops.common.locks import identity_alive, process_identity
from remoteops.common.sizes import human_size

STATE = "model-fetch.json"
LOG = "model-fetch.log"
Say = Callable[[str], None]
Progress = Callable[[int, int | None], None]
RATE_WINDOW_S = 10.0          # the speed shown is over about this many seconds
RECENT_FAILURE_S = 24 * 3600  # status shows a failed download for this long


def resolve(text: str, root: Path) -> model_ref.ModelRef:
    """``train.base_model`` (or the laptop's canonical form of it) as seen from ``root``."""
    try:
        return model_ref.choose(model_ref.parse(text), root)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _upload_hint(host: str) -> str:
    return f"upload the laptop's copy instead: invoke fetch-model --host {host} --from-laptop"


# -- downloading --------------------------------------------------------------------------------

class _Watcher:
    """Reports the bytes a folder holds every second while a download runs."""

    def __init__(self, folder: str, total: int | None, progress: Progress | None):
        self.folder, self.total, self.progress = folder, total, progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Watcher":
        if self.progress:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def held(self) -> int:
        total = 0
        for top, _, files in os.walk(self.folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(top, name)).st_size
                except OSError:
                    pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            done = self.held()
            self.progress(min(done, self.total) if self.total else done, self.total)


def _hf_error(ref: model_ref.ModelRef, exc: BaseException, host: str) -> RemoteOpsError:
    endpoint = model_ref.hf_endpoint(os.environ)
    name = type(exc).__name__
    text = " ".join(str(exc).split())[:240]
    if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return RemoteOpsError(f"{endpoint} refuses {ref.name}@{ref.revision} ({name}); check the "
                              "id, and for a gated model accept its license on the hub and set "
                              "HF_TOKEN in the server's environment.")
    if name == "LocalEntryNotFoundError" or model_ref.hf_offline(os.environ):
        why = "HF_HUB_OFFLINE is set" if model_ref.hf_offline(os.environ) else text
    else:
        why = f"{name}: {text}"
    return RemoteOpsError(f"cannot download {ref.name} from {endpoint} ({why}); set HF_ENDPOINT on "
                          f"the server to a mirror it reaches (e.g. https://hf-mirror.com), or "
                          f"{_upload_hint(host)}.")


def _download_hf(ref: model_ref.ModelRef, say: Say, progress: Progress | None, host: str) -> str:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own progress instead
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise RemoteOpsError("huggingface_hub is not installed in the server's Python; install "
                             f"remoteops[train] there, or {_upload_hint(host)}.") from None
    ignore, total = None, None
    if not model_ref.hf_offline(os.environ):
        try:
            info = HfApi().model_info(ref.name, revision=ref.revision, files_metadata=True)
            sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
            ignore = model_ref.hub_ignore_patterns(sizes)
            total = sum(sizes[n] for n in model_ref.hub_selected(sizes)) or None
            say(f"{ref.name}@{ref.revision}: {len(model_ref.hub_selected(sizes))} files, "
                f"{human_size(total)} from {model_ref.hf_endpoint(os.environ)}")
        except Exception as exc:  # noqa: BLE001 - snapshot_download says it again, classified
            raise _hf_error(ref, exc, host) from None
    repo = model_ref.hf_repo_dir(ref, os.environ)
    try:
        with _Watcher(os.path.join(repo, "blobs"), total, progress):
            return snapshot_download(ref.name, revision=ref.revision, ignore_patterns=ignore)
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one line
        raise _hf_error(ref, exc, host) from None


def _download_modelscope(ref: model_ref.ModelRef, say: Say, progress: Progress | None,
                         host: str) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise RemoteOpsError("modelscope is not installed in the server's Python: pip install "
                             f"modelscope there, or {_upload_hint(host)}.") from None
    dest = model_ref.modelscope_dirs(ref, os.environ)[0]
    say(f"{ref.name}@{ref.revision} from {model_ref.modelscope_endpoint(os.environ)} into {dest}")
    try:
        with _Watcher(dest, None, progress):
            return snapshot_download(ref.name, revision=ref.revision, local_dir=dest)
    except Exception as exc:  # noqa: BLE001
        raise RemoteOpsError(f"cannot download {ref.name} from "
                             f"{model_ref.modelscope_endpoint(os.environ)} ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]}); set MODELSCOPE_DOMAIN to a "
                             f"host the server reaches, or {_upload_hint(host)}.") from None


def verify_blobs(folder: str) -> list[str]:
    """Files of a Hugging Face snapshot whose blob (named by its sha256) does not hash to its
    name; each bad blob is removed, so the next download fetches it again."""
    bad = []
    for rel in model_ref.model_files(folder):
        path = os.path.join(folder, rel)
        if not os.path.islink(path):
            continue
        blob = os.path.realpath(path)
        name = os.path.basename(blob)
        if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
            if sha256_file(blob) != name:
                bad.append(rel)
                os.unlink(blob)
    return bad


def download(ref: model_ref.ModelRef, say: Say = print, progress: Progress | None = None,
             verify: bool = True, host: str = "<this server>") -> dict:
    """Bring a hub model into this machine's cache (resuming); returns where it is."""
    if ref.kind == "local":
        raise ConfigError(f"train.base_model {ref.text} is a folder: there is nothing to download; "
                          "upload it with: invoke fetch-model --host <server> --from-laptop")
    started = time.monotonic()
    cached = model_ref.cache_folder(ref, os.environ)
    already = bool(cached) and not model_ref.inspect_folder(cached)["problems"]
    if already:
        path = cached
        say(f"{ref.name} is already in the cache: {path}")
    else:
        fetch = _download_hf if ref.kind == "hf" else _download_modelscope
        path = fetch(ref, say, progress, host)
    if verify and ref.kind == "hf":
        bad = verify_blobs(path)
        if bad:
            raise RemoteOpsError(f"{len(bad)} file(s) of {ref.name} did not match their sha256 "
                                 f"({bad[0]}); they were removed: run fetch-model again.")
    report = model_ref.inspect_folder(path)
    if report["problems"]:
        raise RemoteOpsError(f"{ref.name} in {path} is incomplete after the download: "
                             f"{'; '.join(report['problems'])}; run fetch-model again (it resumes).")
    return {"ref": ref.canonical(), "path": path, "files": report["files"],
            "bytes": report["bytes"], "already": already, "verified": verify,
            "seconds": round(time.monotonic() - started, 2)}


def _say(line: str) -> None:
    print(line, flush=True)


def ensure_base_model(text: str, root: Path, say: Say = _say) -> str | None:
    """Before training: a hub model that is not cached is downloaded now (resuming), with its
    progress in the stage's log. A folder is left to the trainer's own check."""
    ref = resolve(text, root)
    if ref.kind == "local":
        return None
    cached = model_ref.cache_folder(ref, os.environ)
    if cached and not model_ref.inspect_folder(cached)["problems"]:
        return cached
    say(f"base model {ref.name} is not in this server's cache: downloading it now")
    return download(ref, say, _throttled(say), verify=True)["path"]


def _throttled(say: Say, every: float = 10.0) -> Progress:
    last = [0.0]

    def progress(done: int, total: int | None) -> None:
        if time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            say(f"downloaded {human_size(done)}" + (f" of {human_size(total)}" if total else ""))

    return progress


# -- the detached download and its state --------------------------------------------------------

def state_dir(root: Path) -> Path:
    return root / ".remoteops"


def read_state(root: Path) -> dict | None:
    try:
        state = json.loads((state_dir(root) / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    young = state.get("status") == "starting" and time.time() - state.get("since", 0) < 60
    if state.get("status") in ("starting", "running") and not young and identity_alive(
            state.get("identity")) is False:
        state["status"] = "dead"
        state["message"] = (f"the download process ended without a word (see "
                            f"{state_dir(root) / LOG}); run fetch-model again: it resumes")
    return state


def progress_status(root: Path) -> dict | None:
    """What ``status`` shows of the detached download (``fetch-model``): while it runs, and
    for a day after it failed; None when none ran, or the last one ended well. ``line`` is
    the text, e.g. ``base model: fetching Qwen/Qwen3-8B, 1.2 GB of 16.4 GB (7%), 35.0 MB/s``."""
    state = read_state(root)
    status = (state or {}).get("status")
    if status not in ("starting", "running", "failed", "dead"):
        return None
    try:
        ref = model_ref.parse(state.get("ref") or "")
        name = ref.name + (f"@{ref.revision}" if ref.revision and ref.revision !=
                           model_ref.default_revision(ref.kind) else "")
    except ValueError:
        name = str(state.get("ref"))
    try:
        age = time.time() - (state_dir(root) / STATE).stat().st_mtime
    except OSError:
        age = 0.0
    done, total = int(state.get("done_bytes") or 0), state.get("total_bytes")
    rate = state.get("rate_bytes_per_s")
    message = " ".join(str(state.get("message") or "").split())
    if status in ("failed", "dead"):
        if age > RECENT_FAILURE_S:
            return None
        ago = f"{int(age // 60)} min ago" if age >= 60 else "just now"
        line = f"base model: fetching {name} failed ({ago}): {message[:400]}"
    else:
        line = f"base model: fetching {name}, {human_size(done)}"
        if total:
            line += f" of {human_size(total)} ({int(done * 100 / total)}%)"
        if rate:
            line += f", {human_size(rate)}/s"
        elif not done and message:
            line += f" ({message[:120]})"
    return {"ref": state.get("ref"), "name": name, "status": status, "done_bytes": done,
            "total_bytes": total, "rate_bytes_per_s": rate, "message": message,
            "age_s": round(age, 1), "log": state.get("log"), "line": line}


def _write_state(root: Path, state: dict) -> None:
    write_atomic_json(state_dir(root) / STATE, state)


def start(root: Path, text: str, host: str = "<this server>", wait_seconds: float = 15.0) -> dict:
    """Start the download detached (or find the one running for this model)."""
    from remoteops.server.pipeline import agent_args, spawn_detached

    ref = resolve(text, root)
    if ref.kind == "local":
        download(ref)  # raises: a folder is uploaded, not downloaded
    state = read_state(root)
    if state and state.get("status") in ("starting", "running"):
        if state.get("ref") == ref.canonical():
            return {**state, "attached": True}
        raise RemoteOpsError(f"a download of {state.get('ref')} is running on this server (pid "
                             f"{(state.get('identity') or {}).get('pid')}); wait for it to end.")
    state_dir(root).mkdir(parents=True, exist_ok=True)
    token = f"{time.time_ns()}"
    _write_state(root, {"ref": ref.canonical(), "status": "starting", "token": token,
                        "started": now_iso(), "since": time.time(), "identity": None, "done_bytes": 0,
                        "total_bytes": None, "message": "starting"})
    proc = spawn_detached(agent_args("fetch-model", "--root", str(root), "--ref", ref.canonical(),
                                     "--worker", token, "--host-label", host),
                          state_dir(root) / LOG, root)
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        state = read_state(root) or {}
        if state.get("status") != "starting" or proc.poll() is not None:
            break
        time.sleep(0.1)
    state = read_state(root) or {}
    if state.get("status") == "starting" and proc.poll() is not None:
        state.update(status="failed", message=f"the download process exited ({proc.returncode}) "
                     f"before it started; see {state_dir(root) / LOG}")
        _write_state(root, state)
    return state


def work(root: Path, text: str, token: str, host: str = "<this server>") -> dict:
    """The detached download itself: writes its progress and its end to the state file."""
    ref = resolve(text, root)
    log_path = state_dir(root) / LOG
    state = {"ref": ref.canonical(), "status": "running", "token": token,
             "started": now_iso(), "identity": process_identity(), "done_bytes": 0,
             "total_bytes": None, "message": "connecting", "log": str(log_path)}
    _write_state(root, state)
    lock = threading.Lock()

    def say(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
        with lock:
            state["message"] = line
            _write_state(root, state)

    last = [0.0]
    seen: list[tuple[float, int]] = []  # (when, bytes) over the last seconds: the speed

    def progress(done: int, total: int | None) -> None:
        now = time.monotonic()
        seen.append((now, done))
        while len(seen) > 2 and now - seen[0][0] > RATE_WINDOW_S:
            seen.pop(0)
        rate = None
        if len(seen) > 1 and seen[-1][0] > seen[0][0]:
            rate = max(0.0, (seen[-1][1] - seen[0][1]) / (seen[-1][0] - seen[0][0]))
        with lock:
            state.update(done_bytes=done, total_bytes=total,
                         rate_bytes_per_s=round(rate) if rate is not None else None)
            _write_state(root, state)
        if time.monotonic() - last[0] >= 10:
            last[0] = time.monotonic()
            print(f"{time.strftime('%H:%M:%S')} {human_size(done)}"
                  + (f" of {human_size(total)}" if total else ""), flush=True)

    try:
        result = download(ref, say, progress, host=host)
        state.update(status="done", path=result["path"], done_bytes=result["bytes"],
                     total_bytes=result["bytes"], files=result["files"],
                     already=result["already"],
                     message=f"{ref.name}: {result['files']} files, {human_size(result['bytes'])} "
                             f"in {result['path']} (verified)")
    except RemoteOpsError as exc:
        state.update(status="failed", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - the state must end, whatever happened
        state.update(status="failed", message=f"{type(exc).__name__}: {exc}")
    state["ended"] = now_iso()
    print(f"{time.strftime('%H:%M:%S')} {state['status']}: {state['message']}", flush=True)
    with lock:
        _write_state(root, state)
    return state


__all__ = ["resolve", "download", "ensure_base_model", "start", "work", "read_state",
           "progress_status", "verify_blobs"]
