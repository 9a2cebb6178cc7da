"""The one-request deploy's stdin (both sides): a manifest delta, then the changed files.

When the laptop's record of the server is current, a deploy is one agent request,
``deploy-stream``, whose stdin is::

    MARK \\n <header length> \\n <header JSON> <delta tar.zst bytes> <patches> GO

The header names the base (the content id the laptop believes is deployed), the
entries of the new manifest that differ from the base (with their position in the
new file list), the paths it no longer has, those of its other fields that differ, and
the sha256 of the whole new manifest. The server rebuilds the manifest from its
own ``current.json`` and checks that sha256: any mismatch means the record was
stale and the laptop falls back to the full path. A changed file may come as a patch
against the copy the server has (``patches``: path, its old sha256, the patch's size). ``GO`` comes last: without it
(a cut connection, a cancelled deploy) the server changes nothing.

A full deploy (``deploy_full``) sends the whole manifest instead (``manifest``) and
the tar in ``chunk_frame`` pieces as it is written, then a JSON trailer (size and
sha256 of what was sent) and ``GO``. A first deploy to an empty root may send the tar
before its manifest, which then comes in a ``control_frame`` between two pieces
(``server/stream_first``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields

from remoteops.common.bundle_tar import BundleError
from remoteops.common.manifest import FileEntry, Manifest, content_id

MARK = b"@@REMOTEOPS-STREAM-7f3a@@\n"
GO = b"GO\n"
# The header is small (changed entries only); a bigger one is not ours.
MAX_HEADER = 64 << 20


# A frame whose length has this bit set is not a piece of the tar but a message: a first
# deploy's manifest, sent between two pieces once the laptop has hashed its files
# (``server/stream_first``).
CONTROL = 1 << 63


def control_frame(payload: bytes) -> bytes:
    """A message between the pieces of a tar (``CONTROL``): an 8-byte length with the top bit
    set, then the payload."""
    return (len(payload) | CONTROL).to_bytes(8, "big") + payload


def chunk_frame(data: bytes) -> bytes:
    """One piece of a tar sent while it is written (its size unknown at the start): an
    8-byte length, then the bytes; an empty frame ends the tar."""
    return len(data).to_bytes(8, "big") + data


def apply_patch(old: bytes, patch: bytes, limit: int) -> bytes:
    """A file's new bytes from its old ones and a patch (zstd with the old content as a raw
    dictionary; ``laptop/patches``), at most ``limit`` bytes; zstandard errors propagate."""
    import zstandard

    raw = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdDecompressor(dict_data=raw).decompress(patch, max_output_size=limit)


def manifest_sha256(manifest: Manifest) -> str:
    """The hash of every field of ``manifest`` (compact JSON: the C encoder, fast)."""
    data = {**_meta(manifest),
            "files": [[f.path, f.size, f.mode, f.sha256, f.link] for f in manifest.files]}
    body = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def manifest_delta(base: Manifest, new: Manifest) -> dict:
    """The entries of ``new`` that differ from ``base`` (``[index, entry]``) and the paths
    ``base`` has and ``new`` has not."""
    before = base.file_map()
    put = [[i, asdict(f)] for i, f in enumerate(new.files) if before.get(f.path) != f]
    paths = {f.path for f in new.files}
    return {"put": put, "delete": [f.path for f in base.files if f.path not in paths]}


def encode_header(base: Manifest, new: Manifest, delta: dict | None, extra: dict) -> bytes:
    """``MARK``, the header's length and the header. ``delta``: ``{"size", "sha256"}`` of
    the tar that follows, or None when no file travels."""
    old = _meta(base)
    meta = {k: v for k, v in _meta(new).items() if old.get(k) != v}  # what differs
    return framed_header({"base": base.content_id, "manifest_sha256": manifest_sha256(new),
                          "meta": meta, **manifest_delta(base, new), "delta": delta, **extra})


def framed_header(header: dict) -> bytes:
    """``MARK``, the header's length and the header as compact JSON: how every
    ``deploy-stream`` request begins (``streamapply.Input.header`` reads it)."""
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return MARK + str(len(body)).encode() + b"\n" + body


def _meta(manifest: Manifest) -> dict:
    return {f.name: getattr(manifest, f.name) for f in fields(manifest) if f.name != "files"}


def rebuild(base: Manifest, header: dict) -> Manifest:
    """The new manifest from ``base`` and the header; BundleError when it is not exactly
    the one the laptop hashed (the base differs from the laptop's record)."""
    try:
        put = sorted((int(i), FileEntry(**e)) for i, e in header["put"])
        drop = set(header["delete"]) | {e.path for _, e in put}
        files = [f for f in base.files if f.path not in drop]
        for i, entry in put:
            if i > len(files):
                raise BundleError(f"the manifest delta puts {entry.path} past the end")
            files.insert(i, entry)
        meta = {**_meta(base), **header["meta"]}
        new = Manifest(**{**meta, "files": files})
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"the manifest delta is damaged ({exc})") from None
    if content_id(new.files, new.toolkit_wheel, new.plugins) != new.content_id or \
            manifest_sha256(new) != header["manifest_sha256"]:
        raise BundleError("the manifest rebuilt from the delta does not match its sha256")
    return new


__all__ = ["MARK", "GO", "CONTROL", "chunk_frame", "control_frame", "framed_header", "apply_patch",
           "encode_header", "rebuild", "manifest_delta", "manifest_sha256"]
