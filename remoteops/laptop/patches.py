"""Changed files sent as patches: the new bytes compressed against the old ones.

zstd with the old content as a raw dictionary (``zstd --patch-from``) turns a
one-line edit of a 10 KB file into tens of bytes instead of the ~3.7 KB the whole
file takes compressed. The old bytes come from the bundle last deployed there (only
the frame holding the file is decompressed, ``bundle_tar.read_member_by_frame``) and
must match the sha256 the record lists; the server patches its own copy, which
must match the same sha256, and checks the result's sha256 before staging it
(``server/streamapply``). A file that cannot be patched travels whole.
"""

from __future__ import annotations

import hashlib

from remoteops.common.bundle_tar import read_member_by_frame
from remoteops.common.config import Settings
from remoteops.common.manifest import Manifest
from remoteops.laptop.deploy_common import bundles_dir

PATCH_MAX = 8 << 20  # larger files travel whole (a dictionary that size costs memory)
PATCH_FILES = 64     # more changed files than this: whole, in the delta tar
LEVEL = 19           # a patch is small: the slowest level costs milliseconds


def make_patches(settings: Settings, base: Manifest, new: Manifest,
                 need: list[str]) -> dict[str, tuple[str, bytes]]:
    """``path -> (sha256 of the old content, patch)`` for the changed files worth it."""
    import zstandard

    before, after = base.file_map(), new.file_map()
    wanted = [p for p in need if p in before and before[p].link is None
              and after[p].link is None and before[p].size <= PATCH_MAX
              and after[p].size <= PATCH_MAX]
    if not wanted or len(wanted) > PATCH_FILES:
        return {}
    tar = bundles_dir(settings) / f"{base.project}-v{base.version}.tar.zst"
    members = [(f"files/{f.path}", f.size) for f in base.files if f.link is None]
    members.append((f"toolkit/{base.toolkit_wheel['name']}", base.toolkit_wheel["size"]))
    out: dict[str, tuple[str, bytes]] = {}
    for path in wanted:
        old = read_member_by_frame(tar, members, f"files/{path}")
        if old is None or hashlib.sha256(old).hexdigest() != before[path].sha256:
            continue
        try:
            data = (settings.project_dir / path).read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() != after[path].sha256:
            continue  # changed since it was hashed: whole, from the bundle
        raw = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        patch = zstandard.ZstdCompressor(level=LEVEL, dict_data=raw).compress(data)
        if len(patch) < max(64, len(data) // 2):
            out[path] = (before[path].sha256, patch)
    return out


__all__ = ["make_patches", "PATCH_MAX"]
