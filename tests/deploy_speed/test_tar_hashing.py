"""write_tar hashes a file again while compressing it unless it was hashed at the very stat it
has now (and settled): a file changed after the manifest's hash is never reused as intact."""

from __future__ import annotations

import json
import os
from pathlib import Path

from remoteops.common.bundle_tar import frames_index_path, write_tar
from remoteops.common.files import sha256_file, stat_key


def _keys(tar: Path) -> list:
    return [f["key"] for f in json.loads(frames_index_path(tar).read_text())["frames"]]


def test_a_settled_file_is_not_hashed_twice_and_a_changed_one_is(tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 << 20))  # a frame of its own
    sha, st = sha256_file(src), os.stat(src)
    wrong = "0" * 64  # what a manifest would say if the file changed after it was hashed
    # hashed at this very stat: trusted, so even a wrong sha gives a reusable frame key
    write_tar(tmp_path / "a.tar.zst", [("files/big.bin", src, 0o644, wrong, stat_key(st))])
    assert all(_keys(tmp_path / "a.tar.zst"))
    # no stat (or another one): hashed again; the wrong sha makes the frame not reusable
    write_tar(tmp_path / "b.tar.zst", [("files/big.bin", src, 0o644, wrong)])
    assert _keys(tmp_path / "b.tar.zst") == [None]
    moved = stat_key(st)[:1] + (st.st_mtime_ns + 1,) + stat_key(st)[2:]
    write_tar(tmp_path / "c.tar.zst", [("files/big.bin", src, 0o644, wrong, moved)])
    assert _keys(tmp_path / "c.tar.zst") == [None]
    # the right sha either way: the same bytes, the same reusable frame
    write_tar(tmp_path / "d.tar.zst", [("files/big.bin", src, 0o644, sha, stat_key(st))])
    write_tar(tmp_path / "e.tar.zst", [("files/big.bin", src, 0o644, sha)])
    assert (tmp_path / "d.tar.zst").read_bytes() == (tmp_path / "e.tar.zst").read_bytes()
    assert _keys(tmp_path / "d.tar.zst") == _keys(tmp_path / "e.tar.zst") != [None]
