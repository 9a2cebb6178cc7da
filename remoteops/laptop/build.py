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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from remoteops import __version__
from remoteops.common.config import Settings
from remoteops.common.paths import link_digest, link_entry
from remoteops.common.secret_rules import (SECRET_CANDIDATE, SECRET_FILE_PATTERNS,
                                    looks_like_private_key)
from remoteops.common.bundle_tar import BundleError, write_tar
from remoteops.common.clock import now_iso
from remoteops.common.manifest import FileEntry, Manifest, content_id
from remoteops.common.files import sha256_file, write_atomic_text

if TYPE_CHECKING:  # imported where used: the agent on the server never selects files
    import pathspec

# Excluded whatever the config says: VCS data, caches, environments, outputs. Everyday
# words (env, outputs, checkpoints, ...) are anchored to the project root, so a package
# folder code/env/ or a data/checkpoints/ folder deep in the tree still ships; names
# only tools use are excluded wherever they are. Secrets: remoteops.common.secret_rules.
DEFAULT_EXCLUDES = [
    ".git/", ".hg/", ".svn/", "__pycache__/", "*.py[cod]", ".venv/", "/venv/", "/env/",
    ".mypy_cache/", ".pytest_cache/", ".ruff_cache/", ".ipynb_checkpoints/",
    "node_modules/", "/outputs/", "/bundles/", ".remoteops/", "/checkpoints/", "checkpoint-*/",
    "/wandb/", "/mlruns/", ".DS_Store",
]


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

    def sha256(self, rel: str, path: Path, st: os.stat_result) -> str:
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        cached = self.old.get(rel)
        if isinstance(cached, list) and len(cached) == 5 and cached[:4] == key:
            digest = cached[4]
        else:
            digest = sha256_file(path)
        if self.now - max(st.st_mtime_ns, st.st_ctime_ns) > self.RACY_SECONDS * 10**9:
            self.new[rel] = key + [digest]
        return digest

    def save(self) -> None:
        if self.new == self.old:
            return
        try:
            write_atomic_text(self.path, json.dumps(self.new, separators=(",", ":")))
        except OSError:
            pass  # only a cache (a failed write removes its temp file)


# -- choosing files -------------------------------------------------------------------------

def _spec(lines: Iterable[str]) -> "pathspec.PathSpec":
    import pathspec  # imported here: the agent on the server never selects files

    return pathspec.GitIgnoreSpec.from_lines([l for l in lines if l.strip()])


@dataclass
class Selection:
    """The files to ship, and what was left out and why (for the plan)."""

    paths: list[Path]
    excluded: dict[str, list[str]]          # rule -> excluded paths (a folder ends in /)
    secrets: list[str]                      # secret files left out
    secrets_included: list[str]             # secret files shipped: bundle.include_secrets

    def report(self) -> dict:
        return {"secrets": self.secrets, "secrets_included": self.secrets_included,
                "rules": self.excluded}


def _name_error(path: Path) -> BundleError:
    return BundleError(f"the name of {os.fsencode(path)!r} is not UTF-8, so a bundle (and its "
                       "JSON manifest) cannot carry it; rename it (e.g. convmv -f latin1 -t utf8 "
                       "--notest) or leave it out with bundle.exclude or .gitignore.")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # os.walk turns undecodable bytes into lone surrogates
        return True
    except UnicodeEncodeError:
        return False


def _shown(rel: str) -> str:
    """``rel`` printable: a non-UTF-8 byte shows as \\xNN instead of breaking the output."""
    return rel if _is_utf8(rel) else os.fsencode(rel).decode("utf-8", "backslashreplace")


def select_files(project: Path, include: list[str], exclude: list[str]) -> list[Path]:
    """Project files to ship: not excluded by defaults, config, any .gitignore or as secrets."""
    return select(project, include, exclude).paths


def select(project: Path, include: list[str], exclude: list[str],
           include_secrets: Iterable[str] = (), extra_excludes: Iterable[str] = ()) -> Selection:
    """Choose the files to ship and record what each rule left out.

    ``include_secrets``: paths (globs allowed) relative to the project root of secret
    files to ship anyway. ``extra_excludes``: more anchored rules (the bundles folder).
    """
    rules = [(p, _spec([p])) for p in DEFAULT_EXCLUDES + list(extra_excludes)]
    defaults = _spec(DEFAULT_EXCLUDES + list(extra_excludes))
    configured = _spec(exclude) if exclude else None
    included = _spec(include) if include else None
    secret = _spec(SECRET_FILE_PATTERNS)
    wanted_secrets = [p for p in include_secrets if p.strip()]
    allowed = _spec("/" + p.lstrip("/") for p in wanted_secrets) if wanted_secrets else None
    ignores: list[tuple[str, "pathspec.PathSpec"]] = []
    chosen: list[Path] = []
    excluded: dict[str, list[str]] = {}
    secrets: list[str] = []
    shipped_secrets: list[str] = []
    root = project.resolve()
    for folder, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(folder, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        gitignore = Path(folder) / ".gitignore"
        if gitignore.is_file():
            ignores.append((rel_dir, _spec(gitignore.read_text(errors="replace").splitlines())))

        def rule_for(rel: str) -> str | None:
            """The rule that leaves ``rel`` out (None: it ships)."""
            if defaults.match_file(rel):
                return next(p for p, spec in rules if spec.match_file(rel))
            if configured is not None and configured.match_file(rel):
                return "bundle.exclude"
            for base, spec in ignores:
                if rel.startswith(base) and spec.match_file(rel[len(base):]):
                    return f"{base}.gitignore"
            return None

        kept = []
        for d in sorted(dirs):
            rule = rule_for(f"{rel_dir}{d}/")
            if rule is not None:
                excluded.setdefault(rule, []).append(_shown(f"{rel_dir}{d}/"))
            elif not _is_utf8(d):
                raise _name_error(Path(folder) / d)
            elif os.path.islink(os.path.join(folder, d)):
                link_entry(root, Path(folder) / d)  # a link to a folder: kept as a link
                chosen.append(Path(folder) / d)
            else:
                kept.append(d)
        dirs[:] = kept
        for name in sorted(files):
            rel = f"{rel_dir}{name}"
            path = Path(folder) / name
            rule = rule_for(rel)
            if rule is None and included is not None and not included.match_file(rel):
                rule = "not in bundle.include"
            if rule is not None:
                excluded.setdefault(rule, []).append(_shown(rel))
                continue
            if not _is_utf8(name):
                raise _name_error(path)
            if (SECRET_CANDIDATE.search(rel) and secret.match_file(rel)) or \
                    looks_like_private_key(path):
                if allowed is None or not allowed.match_file(rel):
                    secrets.append(rel)
                    continue
                shipped_secrets.append(rel)
            if path.is_symlink():
                link_entry(root, path)  # kept as a link; one leaving the project is refused
            elif not path.is_file():
                continue
            chosen.append(path)
    return Selection(chosen, excluded, secrets, shipped_secrets)


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
    pending: threading.Thread | None = None  # writing the tar and manifest (background=True)
    error: BaseException | None = None

    def wait(self) -> "Built":
        """Wait until the tar and manifest are written (a background build); re-raise its
        error."""
        if self.pending is not None:
            self.pending.join()
            self.pending = None
        if self.error is not None:
            raise self.error
        return self


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
                 background: bool = False, tap=None) -> Built:
    """Build (or reuse, when nothing changed) the project's next bundle.

    ``on_manifest`` is called with the manifest as soon as it is known, before the
    tar is written (a deploy plans against the server meanwhile). ``background``: return
    as soon as the manifest is known and write the tar and manifest in a thread
    (``Built.wait``); a redeploy that streams its files does not need them first. ``tap``:
    told as the tar's bytes are written (``write_tar``), so they can be sent meanwhile.
    """
    from remoteops.plugins import get_plugin_manager
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
                    settings.get("bundle.include_secrets") or [], own)
    paths = chosen.paths
    if not paths:
        raise BundleError(f"no files to bundle in {project}; check bundle.include / "
                          "bundle.exclude in remoteops.toml.")
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused build leaves nothing behind
    entries = []
    cache = HashCache(out / ".hashes.json")
    for path in paths:
        rel = path.relative_to(project).as_posix()
        if path.is_symlink():  # kept as a link (select refused any leaving the project)
            target = link_entry(project, path)
            entries.append(FileEntry(rel, len(os.fsencode(target)), 0o777, link_digest(target),
                                     link=target))
            continue
        st = path.stat()
        entries.append(FileEntry(rel, st.st_size, stat.S_IMODE(st.st_mode) | 0o600,
                                 cache.sha256(rel, path, st)))
    cache.save()
    wheel = build_toolkit_wheel(out / ".toolkit")
    wheel_info = {"name": wheel.name, "sha256": sha256_file(wheel), "size": wheel.stat().st_size}
    pm = pm or get_plugin_manager(project, settings["plugins_dir"])
    plugins = pm.requirements()
    cid = content_id(entries, wheel_info, plugins)
    previous = _latest(out, name)
    if previous and previous.content_id == cid:
        tar_path = out / f"{name}-v{previous.version}.tar.zst"
        if tar_path.is_file():
            if on_manifest is not None:
                on_manifest(previous)
            return Built(tar_path, out / f"{name}-v{previous.version}.manifest.json", previous,
                         reused=True, seconds=time.monotonic() - started,
                         excluded=chosen.report())
    version = (previous.version + 1) if previous else 1
    commit, dirty = _git_state(project)
    manifest = Manifest(project=name, version=version, content_id=cid,
                        created_at=now_iso(),
                        source_commit=commit, source_dirty=dirty, toolkit_version=__version__,
                        toolkit_wheel=wheel_info, plugins=plugins, files=entries)
    if on_manifest is not None:
        on_manifest(manifest)
    tar_path = out / f"{name}-v{version}.tar.zst"
    members = [(f"files/{e.path}", project / e.path, e.mode, e.sha256) for e in entries
               if e.link is None]  # a link travels in the manifest alone
    members.append((f"toolkit/{wheel.name}", wheel, 0o644, wheel_info["sha256"]))
    earlier = out / f"{name}-v{previous.version}.tar.zst" if previous else None
    manifest_path = out / f"{name}-v{version}.manifest.json"
    built = Built(tar_path, manifest_path, manifest, excluded=chosen.report())

    def write() -> None:
        try:
            write_tar(tar_path, members, int(settings["bundle.compression_level"]), earlier,
                      tap=tap)
            write_atomic_text(manifest_path, manifest.to_json())  # last: the tar is complete
        except BaseException as exc:  # noqa: BLE001 - handed to Built.wait()
            built.error = exc
        built.seconds = time.monotonic() - started

    if background:
        built.pending = threading.Thread(target=write, daemon=True)
        built.pending.start()
        return built
    write()
    return built.wait()


__all__ = ["Built", "build_bundle", "HashCache", "describe_exclusions",
           "select_files", "select", "Selection"]
