"""Large members that do not compress are stored, not compressed, in the bundle tar.

zstd at level 3 spent ~0.13 CPU-s of a full deploy's laptop time on 100 MB of random
bytes (model weights look like that) to gain nothing. ``write_tar`` now samples such a
member and writes its frame as raw blocks: still a standard zstd frame, still a pure
function of the bytes, so builds stay byte-identical and frames stay reusable.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest
import zstandard

from remoteops.common.bundle_tar import frames_index_path, iter_members, write_tar


def _files(root):
    files = {"weights.bin": os.urandom(3 << 20),  # incompressible
             "data.jsonl": b"".join(b'{"text": "line %d of the data set"}\n' % i
                                    for i in range(80_000)),  # large, compressible
             "small.py": b"print('hi')\n"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def _frames(tar):
    return {f["offset"]: f for f in json.loads(frames_index_path(tar).read_text())["frames"]}


def _block_types(data: bytes, offset: int) -> set[int]:
    """The block types of the zstd frame at ``offset`` (0 raw, 1 RLE, 2 compressed)."""
    assert data[offset:offset + 4] == b"\x28\xb5\x2f\xfd"
    fhd = data[offset + 4]
    pos = offset + 5 + (0 if fhd & 0x20 else 1) + [0, 1, 2, 4][fhd & 3] \
        + [0 if not fhd & 0x20 else 1, 2, 4, 8][fhd >> 6]
    types = set()
    while True:
        header = int.from_bytes(data[pos:pos + 3], "little")
        kind, size = (header >> 1) & 3, header >> 3
        types.add(kind)
        pos += 3 + (1 if kind == 1 else size)
        if header & 1:
            return types


def test_an_incompressible_large_member_is_stored_and_reads_back(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = _files(src)
    tar = tmp_path / "b.tar.zst"
    write_tar(tar, [(f"files/{n}", src / n, 0o644) for n in files])
    data = tar.read_bytes()
    frames = _frames(tar)
    kinds = {f["raw"] > 3 << 20 and f["raw"] < (3 << 20) + 4096: _block_types(data, off)
             for off, f in frames.items() if f.get("stored")}
    assert kinds == {True: {0}}  # exactly one stored frame, the weights', all raw blocks
    others = [_block_types(data, off) for off, f in frames.items() if not f.get("stored")]
    assert all(2 in t for t in others)  # the rest compressed as before
    assert len(data) < sum(map(len, files.values())) * 0.6
    # a standard stream: zstandard and tarfile read it back, byte for byte
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data),
                                                      read_across_frames=True).read()
    with tarfile.open(fileobj=io.BytesIO(plain)) as t:
        got = {m.name[len("files/"):]: t.extractfile(m).read() for m in t}
    assert got == files
    assert {m.name: fh.read() for m, fh in iter_members(tar) if fh} == \
        {f"files/{n}": d for n, d in files.items()}
    if shutil.which("zstd"):
        assert subprocess.run(["zstd", "-tq", str(tar)]).returncode == 0


@pytest.mark.parametrize("touched", [False, True])
def test_a_stored_frame_is_reused_only_from_an_untouched_bundle_and_the_bytes_match(
        tmp_path, touched):
    src = tmp_path / "src"
    src.mkdir()
    files = _files(src)
    members = [(f"files/{n}", src / n, 0o644, hashlib.sha256(d).hexdigest())
               for n, d in files.items()]  # with their sha256: the frames have keys
    first, again, fresh = (tmp_path / f"{n}.tar.zst" for n in ("first", "again", "fresh"))
    write_tar(first, members)
    shutil.copy(first, fresh)
    if touched:  # its stat is no longer the indexed one: frames are checked before reuse
        os.utime(first, ns=(1, 1))
    stats = write_tar(again, members, previous=first)
    assert again.read_bytes() == first.read_bytes() == fresh.read_bytes()
    stored = [f for f in _frames(again).values() if f.get("stored")]
    assert len(stored) == 1
    # untouched: every frame copied; touched: the stored one has no checksum to check it
    # by, so it is written again (the compressed ones are checked and copied)
    assert stats["reused"] == stats["frames"] - (1 if touched else 0)
