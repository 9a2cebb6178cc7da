"""Building bundles on the laptop: select files, hash (cached), write the tar and manifest,
and the delta tar of what the server lacks. The manifest format, verify and plan are
``remoteops.common.manifest``.

Versioned training-sync bundles:

A bundle is ``<project>-v<N>.tar.zst`` plus ``<project>-v<N>.manifest.json``.
The tar holds ``files/<path>`` for every project file and
``toolkit/<wheel>`` (remoteops itself, so the server runs the laptop's
version). Builds are deterministic: members sorted, times, owners and the
zstd frame fixed, so the same inputs give the same bytes and content id. The
content id hashes only what is shipped (files, toolkit, plugin set); the
version is bumped only when the content id changes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

try:
    import fcntl
except ImportError:  # not POSIX: bundles are written in-process, there is nothing to wait for
    fcntl = None

from remoteops import __version__
from remoteops.common.config import Settings
from remoteops.common.paths import link_digest, link_entry
from remoteops.common.bundle_tar import BundleError, write_tar
from remoteops.common.clock import now_iso
from remoteops.common.manifest import FileEntry, Manifest, content_id
from remoteops.common.files import sha256_file, stat_key, write_atomic_text
from remoteops.laptop.background import Background
# the choice of files lives in ``selection``; these names stay importable from here
from remoteops.laptop.selection import (DEFAULT_EXCLUDES, Selection, select,  # noqa: F401
                                        select_files)

class HashCache:
    """sha256 of project files, reused while a file's size, mtime, ctime and inode hold.

    Lives next to the bundles (``<out>/.hashes.json``); it only saves reading files,
    the content id is still a hash of their content. Files changed in the last
    few seconds are not cached (a write within the clock's granularity would go
    unnoticed), as git does for racily clean entries.
    """

    RACY_SECONDS = 3

    def __init__(self, path: Path):
        self.path = path
        try:
            self.old = json.loads(path.read_text())
        except (OSError, ValueError):
            self.old = {}
        self.new: dict[str, list] = {}
        self.now = time.time_ns()

    def settled(self, st: os.stat_result) -> bool:
        """Not changed in the last few seconds (a later write shows in its times)."""
        return self.now - max(st.st_mtime_ns, st.st_ctime_ns) > self.RACY_SECONDS * 10**9

    def sha256(self, rel: str, path: Path, st: os.stat_result) -> str:
        key = list(stat_key(st))
        cached = self.old.get(rel)
        if isinstance(cached, list) and len(cached) == 5 and cached[:4] == key:
            digest = cached[4]
        else:
            digest = sha256_file(path)
        if self.settled(st):
            self.new[rel] = key + [digest]
        return digest

    def save(self) -> None:
        if self.new == self.old:
            return
        try:
            write_atomic_text(self.path, json.dumps(self.new, separators=(",", ":")))
        except OSError:
            pass  # only a cache (a failed write removes its temp file)


def _some(paths: list[str], limit: int) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def describe_exclusions(report: dict) -> list[str]:
    """Plan lines: which secret files were left out (or shipped on purpose), and by which
    rule the other paths were (a folder counts once, with a trailing /)."""
    lines = []
    secrets = report.get("secrets") or []
    if secrets:
        lines.append(f"left out {len(secrets)} secret file(s): {_some(secrets, 10)} (to ship "
                     "one, name it in bundle.include_secrets)")
    shipped = report.get("secrets_included") or []
    if shipped:
        lines.append(f"shipping {len(shipped)} secret file(s) named in bundle.include_secrets: "
                     f"{_some(shipped, 10)}")
    rules = report.get("rules") or {}
    if rules:
        parts = [f"{rule} ({len(paths)}: {_some(paths, 3)})" for rule, paths in rules.items()]
        lines.append("left out by rule: " + "; ".join(parts))
    return lines


def _git_state(project: Path) -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=project,
                               capture_output=True, text=True, timeout=30)
        return commit.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        return None, None


# -- building -----------------------------------------------------------------------------

@dataclass
class Built:
    tar_path: Path
    manifest_path: Path
    manifest: Manifest
    reused: bool = False
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    excluded: dict = field(default_factory=dict)  # Selection.report(): what was left out
    pending: threading.Thread | None = None  # writing the tar and manifest in a thread
    error: BaseException | None = None
    deferred: Callable[[], None] | None = None  # writes them, not started yet
    tap: object = None  # told as the tar is written (``write_tar``); may be set until then

    def wait(self) -> "Built":
        """Wait until the tar and manifest are written (a background build; a deferred one is
        written now); re-raise its error."""
        if self.deferred is not None:
            write, self.deferred = self.deferred, None
            write()
        if self.pending is not None:
            self.pending.join()
            self.pending = None
        if self.error is not None:
            raise self.error
        return self

    def start_pending(self) -> None:
        """Start writing the tar and manifest in a thread now (``wait`` joins it)."""
        if self.deferred is not None and self.pending is None:
            self.pending = threading.Thread(target=self.deferred, daemon=True)
            self.deferred = None
            self.pending.start()

    def finish_detached(self) -> bool:
        """Write a deferred tar in a forked child, so the command ends now (the next build
        waits for it: ``writer_lock``). False: not possible here (threads still running,
        no fork); ``wait`` then writes it."""
        if self.deferred is None or threading.active_count() > 1 or not hasattr(os, "fork") \
                or fcntl is None:
            return False
        lock = writer_lock(self.tar_path.parent, exclusive=True)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: nothing of the command's output or terminal
            code = 1
            try:
                os.setsid()
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.closerange(3, lock.fileno())
                os.closerange(lock.fileno() + 1, 1 << 16)
                self.wait()
                code = 0
            except BaseException:  # noqa: BLE001 - the tar is missing; the next build makes one
                pass
            finally:
                os._exit(code)
        lock.close()  # the child holds the lock until the tar is written
        self.deferred = None
        return True


def writer_lock(out_dir: Path, exclusive: bool = False):
    """The bundles folder's writer lock, held (an open file): a detached tar writer holds it
    exclusively; a build takes it shared first, so it never reads a half-made history."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fh = open(out_dir / ".writing.lock", "a")
    if fcntl is not None:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    return fh


def _latest(out_dir: Path, project: str) -> Manifest | None:
    found = sorted(out_dir.glob(f"{project}-v*.manifest.json"),
                   key=lambda p: int(p.name.rsplit("-v", 1)[1].split(".")[0]))
    for path in reversed(found):
        try:
            return Manifest.from_json(path.read_text())
        except BundleError:
            continue
    return None


def build_bundle(settings: Settings, out_dir: str | Path | None = None, pm=None,
                 on_manifest: Callable[[Manifest], None] | None = None,
                 background: bool | str = False, tap=None,
                 on_first: Callable[[int], None] | None = None) -> Built:
    """Build (or reuse, when nothing changed) the project's next bundle.

    ``on_manifest`` is called with the manifest as soon as it is known, before the
    tar is written (a deploy plans against the server meanwhile). ``background``: return
    as soon as the manifest is known and write the tar and manifest in a thread
    (``Built.wait``); a redeploy that streams its files does not need them first. ``tap``:
    told as the tar's bytes are written (``write_tar``), so they can be sent meanwhile.
    ``background="deferred"``: return; the tar and manifest are written by ``Built.wait``
    when something needs them, else by ``Built.finish_detached`` after the command (a
    streamed redeploy sends its files from the project, and rewriting a 100 MB bundle for
    a one-file change was most of its time). Whoever reads the bundles folder next waits
    for that (``writer_lock``). ``on_first(size)``: a first bundle's tar is being written
    while the files are hashed (``EarlyTar``; ``size``: their total), told before hashing.
    """
    from remoteops.laptop.plugin_set import plugin_set
    from remoteops.laptop.wheel import build_toolkit_wheel

    started = time.monotonic()
    project = settings.project_dir
    name = settings.project_name
    out = Path(out_dir or settings["bundle.out_dir"])
    out = out if out.is_absolute() else project / out
    own = []  # the bundles folder itself, when it is inside the project under another name
    if out.resolve().is_relative_to(project.resolve()) and out.resolve() != project.resolve():
        own.append("/" + out.resolve().relative_to(project.resolve()).as_posix() + "/")
    chosen = select(project, settings["bundle.include"], settings["bundle.exclude"],
                    settings.get("bundle.include_secrets") or [], own,
                    cache=out / ".selection.json")
    paths = chosen.paths
    if not paths:
        raise BundleError(f"no files to bundle in {project}; check bundle.include / "
                          "bundle.exclude in remoteops.toml.")
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused build leaves nothing behind
    with writer_lock(out):  # a tar still being written by an earlier deploy's child
        previous = _latest(out, name)
    wheel = build_toolkit_wheel(out / ".toolkit")
    wheel_info = {"name": wheel.name, "sha256": sha256_file(wheel), "size": wheel.stat().st_size}
    wheel_member = (f"toolkit/{wheel.name}", wheel, 0o644, wheel_info["sha256"])
    level = int(settings["bundle.compression_level"])
    stats = {rel: path.stat() for path, rel in zip(paths, chosen.rels) if rel not in chosen.links}
    cache = HashCache(out / ".hashes.json")
    early = None
    if background is True and previous is None:  # a first bundle: compressed while hashed
        early = EarlyTar(out / f"{name}-v1.tar.zst", out / f"{name}-v1.manifest.json",
                         [(f"files/{rel}", project / rel, _mode(st)) for rel, st in stats.items()]
                         + [wheel_member], level, tap, cache,
                         {f"files/{rel}": st for rel, st in stats.items()})
        if on_first is not None:
            on_first(sum(st.st_size for st in stats.values()))
    # the plugin set and the git state do not depend on the hashes: found meanwhile (~20 ms
    # of a first build's, that were in line before the first byte could be sent)
    side = Background(lambda: (pm.requirements() if pm is not None else
                               plugin_set(project, settings["plugins_dir"],
                                          out / ".plugins.json"),
                               _git_state(project)))
    try:
        entries = []
        hashed_as: dict[str, tuple] = {}
        for path, rel in zip(paths, chosen.rels):
            if rel in chosen.links:  # kept as a link (select refused any leaving the project)
                target = link_entry(project, path)
                entries.append(FileEntry(rel, len(os.fsencode(target)), 0o777,
                                         link_digest(target), link=target))
                continue
            st = stats[rel]
            entries.append(FileEntry(rel, st.st_size, _mode(st), cache.sha256(rel, path, st)))
            if cache.settled(st):  # hashed as it is: the tar need not hash it again
                hashed_as[rel] = stat_key(st)
        cache.save()
        plugins, (commit, dirty) = side.result()
        cid = content_id(entries, wheel_info, plugins)
    except BaseException as exc:
        side.settle()
        if early is not None:
            early.fail(exc)
        raise
    if previous and previous.content_id == cid:
        tar_path = out / f"{name}-v{previous.version}.tar.zst"
        if tar_path.is_file():
            if on_manifest is not None:
                on_manifest(previous)
            return Built(tar_path, out / f"{name}-v{previous.version}.manifest.json", previous,
                         reused=True, seconds=time.monotonic() - started,
                         excluded=chosen.report())
    version = (previous.version + 1) if previous else 1
    manifest = Manifest(project=name, version=version, content_id=cid,
                        created_at=now_iso(),
                        source_commit=commit, source_dirty=dirty, toolkit_version=__version__,
                        toolkit_wheel=wheel_info, plugins=plugins, files=entries)
    tar_path = out / f"{name}-v{version}.tar.zst"
    manifest_path = out / f"{name}-v{version}.manifest.json"
    built = Built(tar_path, manifest_path, manifest, excluded=chosen.report(), tap=tap)
    if early is not None:
        early.hashed({f"files/{e.path}": (e.sha256, hashed_as.get(e.path)) for e in entries
                      if e.link is None}, manifest, built, started)
        if on_manifest is not None:
            on_manifest(manifest)
        return built
    if on_manifest is not None:
        on_manifest(manifest)
    members = [(f"files/{e.path}", project / e.path, e.mode, e.sha256, hashed_as.get(e.path))
               for e in entries if e.link is None]  # a link travels in the manifest alone
    members.append(wheel_member)
    earlier = out / f"{name}-v{previous.version}.tar.zst" if previous else None

    def write() -> None:
        try:
            write_tar(tar_path, members, level, earlier, tap=built.tap)
            write_atomic_text(manifest_path, manifest.to_json())  # last: the tar is complete
        except BaseException as exc:  # noqa: BLE001 - handed to Built.wait()
            built.error = exc
        built.seconds = time.monotonic() - started

    built.deferred = write
    if background == "deferred":  # written when needed, or after the command
        return built
    if background:
        built.start_pending()
        return built
    return built.wait()


def _mode(st: os.stat_result) -> int:
    return stat.S_IMODE(st.st_mode) | 0o600


class EarlyTar:
    """A first bundle's tar, compressed in a thread from the files' stat while the laptop
    still hashes them (``write_tar``'s ``late``): a first full deploy's bytes start to
    flow as soon as the plan is back instead of after the hashing. ``hashed`` hands over
    the hashes and the manifest (written last, as always); ``fail``: the build stopped,
    the half-written tar is removed."""

    def __init__(self, tar_path: Path, manifest_path: Path, members: list[tuple], level: int,
                 tap, cache: HashCache, seen: dict | None = None):
        self._cache = cache
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._written: BaseException | None = None  # how the writing ended (None: well)
        self._hashes: dict = {}
        self._manifest: Manifest | None = None
        self._error: BaseException | None = None
        self._built: Built | None = None
        self._paths = tar_path, manifest_path
        self.thread = threading.Thread(target=self._write, args=(members, level, tap, seen),
                                       name="remoteops-early-tar")  # not a daemon: it cleans up
        self.thread.start()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def settled(self, st: os.stat_result) -> bool:
        """The hash pass will not hash this file again (``HashCache.settled``)."""
        return self._cache.settled(st)

    def wait(self) -> dict:
        self._ready.wait()
        self.check()
        return self._hashes

    def hashed(self, hashes: dict, manifest: Manifest, built: Built, started: float) -> None:
        self._hashes, self._manifest, self._started = hashes, manifest, started
        with self._lock:
            self._built = built
            built.error = self._written  # it may have failed already (a file gone)
        built.pending = self.thread
        self._ready.set()

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self._ready.set()
        self.thread.join()

    def _write(self, members: list[tuple], level: int, tap, seen: dict | None) -> None:
        tar_path, manifest_path = self._paths
        error = None
        try:
            write_tar(tar_path, members, level, None, tap=tap, late=self, seen=seen)
            write_atomic_text(manifest_path, self._manifest.to_json())  # last, as always
        except BaseException as exc:  # noqa: BLE001 - handed to Built.wait()
            error = exc
        with self._lock:
            self._written = error
            if self._built is not None:
                self._built.error = error
                self._built.seconds = time.monotonic() - self._started


__all__ = ["Built", "build_bundle", "HashCache", "describe_exclusions",
           "select_files", "select", "Selection"]
