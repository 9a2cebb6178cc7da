"""Versioned training-sync bundles: build, manifest, verify, diff.

A bundle is ``<project>-v<N>.tar.zst`` plus ``<project>-v<N>.manifest.json``.
The tar holds ``files/<path>`` for every project file and
``toolkit/<wheel>`` (remoteops itself, so the server runs the laptop's
version). Builds are deterministic: members sorted, times, owners and the
zstd frame fixed, so the same inputs give the same bytes and content id. The
content id hashes only what is shipped (files, toolkit, plugin set); the
version is bumped only when the content id changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import pathspec

from remoteops import __version__
from remoteops.config import Settings
from remoteops.errors import RemoteOpsError

FORMAT = 1
CHUNK = 1 << 20
# Excluded whatever the config says: VCS data, caches, environments, outputs, secrets.
DEFAULT_EXCLUDES = [
    ".git/", ".hg/", ".svn/", "__pycache__/", "*.py[cod]", ".venv/", "venv/", "env/",
    ".env", ".env.*", ".mypy_cache/", ".pytest_cache/", ".ruff_cache/", ".ipynb_checkpoints/",
    "node_modules/", "outputs/", "bundles/", ".remoteops/", "checkpoints/", "checkpoint-*/",
    "wandb/", "mlruns/", ".DS_Store",
]


class BundleError(RemoteOpsError):
    """A bundle is missing, tampered with, truncated, or unsafe."""


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    mode: int
    sha256: str


@dataclass
class Manifest:
    project: str
    version: int
    content_id: str
    created_at: str
    source_commit: str | None
    source_dirty: bool | None
    toolkit_version: str
    toolkit_wheel: dict
    plugins: list[str]
    files: list[FileEntry]
    format: int = FORMAT

    def file_map(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise BundleError(f"bundle format {data.get('format')} is not {FORMAT}; rebuild "
                                  "it with this remoteops (invoke build-bundle).")
            data["files"] = [FileEntry(**f) for f in data["files"]]
            return cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise BundleError(f"the bundle manifest is damaged ({exc}); rebuild it with "
                              "invoke build-bundle.") from None


def content_id(files: Iterable[FileEntry], toolkit_wheel: dict, plugins: list[str]) -> str:
    body = json.dumps({"format": FORMAT, "files": [asdict(f) for f in files],
                       "toolkit": toolkit_wheel, "plugins": sorted(plugins)}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# -- choosing files -------------------------------------------------------------------------

def _spec(lines: Iterable[str]) -> pathspec.PathSpec:
    return pathspec.GitIgnoreSpec.from_lines([l for l in lines if l.strip()])


def select_files(project: Path, include: list[str], exclude: list[str]) -> list[Path]:
    """Project files to ship: not excluded by defaults, config or any .gitignore."""
    excluded = _spec(DEFAULT_EXCLUDES + list(exclude))
    included = _spec(include) if include else None
    ignores: list[tuple[str, pathspec.PathSpec]] = []
    chosen: list[Path] = []
    root = project.resolve()
    for folder, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(folder, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        gitignore = Path(folder) / ".gitignore"
        if gitignore.is_file():
            ignores.append((rel_dir, _spec(gitignore.read_text(errors="replace").splitlines())))

        def ignored(rel: str) -> bool:
            if excluded.match_file(rel):
                return True
            return any(rel.startswith(base) and spec.match_file(rel[len(base):])
                       for base, spec in ignores)

        dirs[:] = sorted(d for d in dirs if not ignored(f"{rel_dir}{d}/"))
        for name in sorted(files):
            rel = f"{rel_dir}{name}"
            path = Path(folder) / name
            if ignored(rel) or (included is not None and not included.match_file(rel)):
                continue
            if path.is_symlink():
                target = path.resolve()
                if not target.is_file() or root not in target.parents:
                    continue  # links leaving the project are not shipped
            elif not path.is_file():
                continue
            chosen.append(path)
    return chosen


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


def _tarinfo(name: str, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(out: Path, members: list[tuple[str, Path, int]], level: int = 3) -> None:
    """A deterministic zstd-compressed tar of ``(name, source, mode)`` members (atomic)."""
    import zstandard

    tmp = out.with_name(out.name + ".tmp")
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=0)
    with open(tmp, "wb") as raw, cctx.stream_writer(raw, closefd=False) as zw, \
            tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, source, mode in members:
            with open(source, "rb") as fh:
                tar.addfile(_tarinfo(name, os.fstat(fh.fileno()).st_size, mode), fh)
    os.replace(tmp, out)


def _latest(out_dir: Path, project: str) -> Manifest | None:
    found = sorted(out_dir.glob(f"{project}-v*.manifest.json"),
                   key=lambda p: int(p.name.rsplit("-v", 1)[1].split(".")[0]))
    for path in reversed(found):
        try:
            return Manifest.from_json(path.read_text())
        except BundleError:
            continue
    return None


def build_bundle(settings: Settings, out_dir: str | Path | None = None, pm=None) -> Built:
    """Build (or reuse, when nothing changed) the project's next bundle."""
    from remoteops.plugins import get_plugin_manager
    from remoteops.wheel import build_toolkit_wheel

    started = time.monotonic()
    project = settings.project_dir
    name = settings.project_name
    out = Path(out_dir or settings["bundle.out_dir"])
    out = out if out.is_absolute() else project / out
    out.mkdir(parents=True, exist_ok=True)
    paths = select_files(project, settings["bundle.include"], settings["bundle.exclude"])
    if not paths:
        raise BundleError(f"no files to bundle in {project}; check bundle.include / "
                          "bundle.exclude in remoteops.toml.")
    entries = []
    for path in paths:
        st = path.stat()
        entries.append(FileEntry(path.relative_to(project).as_posix(), st.st_size,
                                 stat.S_IMODE(st.st_mode) | 0o600, sha256_file(path)))
    wheel = build_toolkit_wheel(out / ".toolkit")
    wheel_info = {"name": wheel.name, "sha256": sha256_file(wheel), "size": wheel.stat().st_size}
    pm = pm or get_plugin_manager(project, settings["plugins_dir"])
    plugins = pm.requirements()
    cid = content_id(entries, wheel_info, plugins)
    previous = _latest(out, name)
    if previous and previous.content_id == cid:
        tar_path = out / f"{name}-v{previous.version}.tar.zst"
        if tar_path.is_file():
            return Built(tar_path, out / f"{name}-v{previous.version}.manifest.json", previous,
                         reused=True, seconds=time.monotonic() - started)
    version = (previous.version + 1) if previous else 1
    commit, dirty = _git_state(project)
    manifest = Manifest(project=name, version=version, content_id=cid,
                        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        source_commit=commit, source_dirty=dirty, toolkit_version=__version__,
                        toolkit_wheel=wheel_info, plugins=plugins, files=entries)
    tar_path = out / f"{name}-v{version}.tar.zst"
    members = [(f"files/{e.path}", project / e.path, e.mode) for e in entries]
    members.append((f"toolkit/{wheel.name}", wheel, 0o644))
    write_tar(tar_path, members, int(settings["bundle.compression_level"]))
    manifest_path = out / f"{name}-v{version}.manifest.json"
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, manifest_path)
    return Built(tar_path, manifest_path, manifest, seconds=time.monotonic() - started)


# -- reading and verifying -------------------------------------------------------------------

def check_member(member: tarfile.TarInfo) -> None:
    """Refuse absolute paths, '..', links and devices before anything is extracted."""
    name = member.name
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "\\" in name or not name:
        raise BundleError(f"the bundle holds an unsafe path {name!r}; refusing it (rebuild the "
                          "bundle from a clean tree).")
    if not (member.isfile() or member.isdir()):
        raise BundleError(f"the bundle holds {name!r}, which is a link or device; refusing it.")


class _MemberReader:
    """A member's file object whose read errors (bad zstd frame, short tar) are BundleErrors."""

    def __init__(self, fh, tar_name: str):
        self._fh, self._tar_name = fh, tar_name

    def read(self, size: int = -1) -> bytes:
        import zstandard

        try:
            return self._fh.read(size)
        except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as exc:
            raise BundleError(f"{self._tar_name} is truncated or corrupted ({exc}); rebuild it "
                              "with invoke build-bundle.") from None


def iter_members(tar_path: Path):
    """Yield ``(member, fileobj)`` of a bundle tar, checking each member is safe."""
    import zstandard

    try:
        with open(tar_path, "rb") as raw, \
                zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as zr, \
                tarfile.open(fileobj=zr, mode="r|") as tar:
            for member in tar:
                check_member(member)
                yield member, (_MemberReader(tar.extractfile(member), tar_path.name)
                               if member.isfile() else None)
    except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as exc:
        raise BundleError(f"{tar_path.name} is truncated or corrupted ({exc}); rebuild it with "
                          "invoke build-bundle.") from None


def load_manifest(path: Path) -> Manifest:
    if not path.is_file():
        raise BundleError(f"{path} does not exist; build a bundle with invoke build-bundle.")
    return Manifest.from_json(path.read_text(encoding="utf-8"))


def manifest_for(tar_path: Path) -> Path:
    return tar_path.with_name(tar_path.name.replace(".tar.zst", ".manifest.json"))


def verify_bundle(tar_path: Path, manifest: Manifest | None = None) -> Manifest:
    """Check every byte of a bundle against its manifest; raise BundleError otherwise."""
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise BundleError(f"{tar_path} does not exist; build one with invoke build-bundle.")
    manifest = manifest or load_manifest(manifest_for(tar_path))
    if content_id(manifest.files, manifest.toolkit_wheel, manifest.plugins) != manifest.content_id:
        raise BundleError(f"the manifest of {tar_path.name} was altered (content id does not "
                          "match); rebuild the bundle.")
    expected = {f"files/{f.path}": f.sha256 for f in manifest.files}
    expected[f"toolkit/{manifest.toolkit_wheel['name']}"] = manifest.toolkit_wheel["sha256"]
    for member, fh in iter_members(tar_path):
        if fh is None:
            continue
        want = expected.pop(member.name, None)
        if want is None:
            raise BundleError(f"{tar_path.name} holds {member.name}, which its manifest does not "
                              "list; refusing it.")
        h = hashlib.sha256()
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
        if h.hexdigest() != want:
            raise BundleError(f"{member.name} in {tar_path.name} does not match its sha256 (the "
                              "bundle was tampered with or damaged); rebuild it.")
    if expected:
        raise BundleError(f"{tar_path.name} lacks {len(expected)} file(s) its manifest lists, "
                          f"e.g. {sorted(expected)[0]}; it is truncated: rebuild it.")
    return manifest


# -- comparing ----------------------------------------------------------------------------

@dataclass
class Plan:
    added: list[str]
    changed: list[str]
    deleted: list[str]
    send_bytes: int = 0

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.deleted)

    def to_dict(self) -> dict:
        return asdict(self)


def diff(current: dict[str, str], new: Manifest) -> Plan:
    """Plan from a ``{path: sha256}`` of what the server has to a new manifest."""
    files = new.file_map()
    added = sorted(p for p in files if p not in current)
    changed = sorted(p for p in files if p in current and current[p] != files[p].sha256)
    deleted = sorted(p for p in current if p not in files)
    send = sum(files[p].size for p in added + changed)
    return Plan(added, changed, deleted, send)


def write_delta(bundle_tar: Path, names: list[str], out: Path, level: int = 3) -> Path:
    """A deterministic tar.zst holding only ``files/<name>`` for ``names``, from a bundle."""
    import zstandard

    wanted = {f"files/{n}" for n in names}
    if out.is_file():
        return out  # the name carries the content: same name, same bytes
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    members = []
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=0)
    with open(tmp, "wb") as raw, cctx.stream_writer(raw, closefd=False) as zw, \
            tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for member, fh in iter_members(bundle_tar):
            if fh is not None and member.name in wanted:
                tar.addfile(_tarinfo(member.name, member.size, member.mode), fh)
                members.append(member.name)
    missing = wanted - set(members)
    if missing:
        tmp.unlink()
        raise BundleError(f"{bundle_tar.name} lacks {sorted(missing)[0]}; it is truncated: "
                          "rebuild it.")
    os.replace(tmp, out)
    return out


def read_member_bytes(tar_path: Path, name: str) -> bytes:
    for member, fh in iter_members(tar_path):
        if member.name == name and fh is not None:
            return fh.read()
    raise BundleError(f"{tar_path.name} has no {name}; rebuild the bundle.")


def extract_files(tar_path: Path, dest: Path, names: set[str]) -> None:
    """Copy the named ``files/...`` members into ``dest`` (same relative paths)."""
    for member, fh in iter_members(tar_path):
        if fh is None or member.name not in names:
            continue
        target = dest / member.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                out.write(chunk)


__all__ = ["Manifest", "FileEntry", "Plan", "Built", "BundleError", "build_bundle",
           "verify_bundle", "diff", "select_files", "write_tar", "iter_members"]
