"""The bundle manifest (the format both sides read): entries, content id, verify, plan.

A bundle is ``<project>-v<N>.tar.zst`` plus ``<project>-v<N>.manifest.json``; the tar
format itself is ``remoteops.common.bundle_tar``. The laptop builds bundles
(``remoteops.laptop.build``); the server reads manifests, verifies members and plans an
apply with ``plan_between``, the same answer the laptop computes for its delta.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

from remoteops.common.bundle_tar import FORMAT, BundleError, iter_members  # noqa: F401
from remoteops.common.files import sha256_fileobj

# Bytes a deploy leaves free on the server beyond what it writes (both sides plan with it).
DISK_HEADROOM = 16 << 20


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    mode: int
    sha256: str
    link: str | None = None  # a link's target (then sha256 is paths.link_digest of it)


def _entry_dict(entry: FileEntry) -> dict:
    """An entry as stored and hashed; ``link`` only on links, so ids of trees without
    links are what they were before links were kept."""
    data = {"path": entry.path, "size": entry.size, "mode": entry.mode, "sha256": entry.sha256}
    if entry.link is not None:  # built by hand: asdict() deep-copies, ~10x slower
        data["link"] = entry.link
    return data


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

    def to_dict(self) -> dict:
        """What ``to_json`` writes, as a dict."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "files"}
        data["files"] = [_entry_dict(f) for f in self.files]
        return json.loads(json.dumps(data))  # a deep copy (the C encoder: fast)

    def to_json(self) -> str:
        """Keys sorted, one file entry per line: readable and diffable, and written by
        json's C encoder (``indent`` makes json use its Python one: 40 ms for 2,000 files,
        on the way to a deploy's first byte)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}

        def text(value) -> str:
            return json.dumps(value, sort_keys=True, ensure_ascii=False)

        lines = []
        for key in sorted(data):
            if key == "files":
                entries = ",\n".join("  " + text(_entry_dict(f)) for f in self.files)
                lines.append(f' "files": [\n{entries}\n ]' if entries else ' "files": []')
            else:
                lines.append(f" {text(key)}: {text(data[key])}")
        return "{\n" + ",\n".join(lines) + "\n}\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BundleError(f"the bundle manifest is damaged ({exc}); rebuild it with "
                              "invoke build-bundle.") from None
        return cls.from_data(data)

    @classmethod
    def from_data(cls, data) -> "Manifest":
        """A manifest from its JSON already parsed (a request's header): not changed."""
        try:
            data = dict(data)
            if data.get("format") != FORMAT:
                raise BundleError(f"bundle format {data.get('format')} is not {FORMAT}; rebuild "
                                  "it with this remoteops (invoke build-bundle).")
            data["files"] = [FileEntry(**f) for f in data["files"]]
            return cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise BundleError(f"the bundle manifest is damaged ({exc}); rebuild it with "
                              "invoke build-bundle.") from None


def content_id(files: Iterable[FileEntry], toolkit_wheel: dict, plugins: list[str]) -> str:
    body = json.dumps({"format": FORMAT, "files": [_entry_dict(f) for f in files],
                       "toolkit": toolkit_wheel, "plugins": sorted(plugins)}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


# -- reading and verifying -------------------------------------------------------------------

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
    expected = {f"files/{f.path}": f.sha256 for f in manifest.files if f.link is None}
    expected[f"toolkit/{manifest.toolkit_wheel['name']}"] = manifest.toolkit_wheel["sha256"]
    for member, fh in iter_members(tar_path):
        if fh is None:
            continue
        want = expected.pop(member.name, None)
        if want is None:
            raise BundleError(f"{tar_path.name} holds {member.name}, which its manifest does not "
                              "list; refusing it.")
        if sha256_fileobj(fh)[1] != want:
            raise BundleError(f"{member.name} in {tar_path.name} does not match its sha256 (the "
                              "bundle was tampered with or damaged); rebuild it.")
    if expected:
        raise BundleError(f"{tar_path.name} lacks {len(expected)} file(s) its manifest lists, "
                          f"e.g. {sorted(expected)[0]}; it is truncated: rebuild it.")
    return manifest


# -- comparing ----------------------------------------------------------------------------

def plan_between(old: Manifest | None, new: Manifest) -> dict:
    """What turns a tree holding exactly ``old`` into ``new`` (sha256 and mode per file).

    The same answer the server's plan gives when its disk matches ``old``: the laptop
    plans locally with it, and the server checks its own plan against it.
    """
    before = old.file_map() if old else {}
    wanted = new.file_map()
    need = sorted(p for p, f in wanted.items() if p not in before
                  or before[p].sha256 != f.sha256 or before[p].mode != f.mode)
    return {"need": need, "delete": sorted(p for p in before if p not in wanted),
            "added": [p for p in need if p not in before],
            "changed": [p for p in need if p in before],
            "unchanged": len(wanted) - len(need)}


def read_member_bytes(tar_path: Path, name: str) -> bytes:
    for member, fh in iter_members(tar_path):
        if member.name == name and fh is not None:
            return fh.read()
    raise BundleError(f"{tar_path.name} has no {name}; rebuild the bundle.")


__all__ = ["Manifest", "FileEntry", "BundleError", "content_id", "load_manifest", "manifest_for",
           "verify_bundle", "plan_between", "read_member_bytes", "iter_members"]
