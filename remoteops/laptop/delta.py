"""Deltas: a bundle's changed files as one small tar, the upload of a redeploy.

A delta holds the named files in bundle member order (compressed the same way),
so the server stages it exactly as it would the bundle. Files that still match
the manifest are read from the project folder, else from the bundle itself.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from remoteops.common.bundle_tar import BundleError, iter_members
from remoteops.common.files import atomic_output
from remoteops.common.tar_header import tarinfo
from remoteops.common.manifest import FileEntry, Manifest


def project_sources(manifest: Manifest, names: list[str], source_dir: Path,
                     limit: int = 64 << 20) -> list[tuple[FileEntry, bytes]] | None:
    """The named files read from the project folder, when each still matches the manifest.

    In manifest (= bundle member) order. None when any does not (then read the bundle).
    Links are left out: they travel in the manifest alone.
    """
    wanted = set(names) - {f.path for f in manifest.files if f.link is not None}
    out, total = [], 0
    for entry in manifest.files:
        if entry.path not in wanted:
            continue
        total += entry.size
        if total > limit:
            return None
        try:
            data = (source_dir / entry.path).read_bytes()
        except OSError:
            return None
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            return None
        out.append((entry, data))
    return out if len(out) == len(wanted) else None


def write_delta(bundle_tar: Path, names: list[str], out: Path, level: int = 3,
                manifest: Manifest | None = None, source_dir: Path | None = None) -> Path:
    """A deterministic tar.zst holding only ``files/<name>`` for ``names``, from a bundle.

    With ``manifest`` and ``source_dir`` (the project the bundle was built from), files
    that still match the manifest's sha256 are read from there rather than by
    decompressing the whole bundle; the bytes written are the same either way.
    """
    import io

    import zstandard

    if manifest is not None:  # links travel in the manifest alone
        links = {f.path for f in manifest.files if f.link is not None}
        names = [n for n in names if n not in links]
    wanted = {f"files/{n}" for n in names}
    if out.is_file():
        return out  # the name carries the content: same name, same bytes
    out.parent.mkdir(parents=True, exist_ok=True)
    members = []
    sources = (project_sources(manifest, names, source_dir)
               if manifest is not None and source_dir is not None else None)
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=0)
    with atomic_output(out) as raw:
        with cctx.stream_writer(raw, closefd=False) as zw, \
                tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            if sources is not None:
                for entry, data in sources:
                    name = f"files/{entry.path}"
                    tar.addfile(tarinfo(name, entry.size, entry.mode), io.BytesIO(data))
                    members.append(name)
            else:
                for member, fh in iter_members(bundle_tar):
                    if fh is not None and member.name in wanted:
                        tar.addfile(tarinfo(member.name, member.size, member.mode), fh)
                        members.append(member.name)
        missing = wanted - set(members)
        if missing:  # raising leaves no file behind
            raise BundleError(f"{bundle_tar.name} lacks {sorted(missing)[0]}; it is truncated: "
                              "rebuild it.")
    return out


__all__ = ["write_delta", "project_sources"]
