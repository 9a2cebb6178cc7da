"""The deploy speed-ups keep bundles deterministic: frame reuse, hash cache, deltas."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from remoteops.common.bundle_tar import iter_members, write_tar
from remoteops.common.manifest import load_manifest
from remoteops.laptop.build import HashCache
from remoteops.laptop.delta import write_delta


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path, n: int = 60) -> list[tuple]:
    folder.mkdir()
    out = []
    for i in range(n):
        path = folder / f"f{i:03d}.txt"
        path.write_bytes((f"line {i} " * (50 + i * 7)).encode() + os.urandom(i))
        out.append((f"files/f{i:03d}.txt", path, 0o644, _digest(path)))
    big = folder / "big.bin"
    big.write_bytes(os.urandom(1_500_000))
    out.append(("files/big.bin", big, 0o644, _digest(big)))
    return out


def test_reused_frames_give_the_same_bytes_as_a_fresh_build(tmp_path):
    members = _files(tmp_path / "src")
    first = tmp_path / "a.tar.zst"
    stats = write_tar(first, members, 3)
    assert stats["frames"] > 2 and stats["reused"] == 0
    again = tmp_path / "b.tar.zst"
    stats = write_tar(again, members, 3, previous=first)
    assert stats["reused"] == stats["frames"] and _digest(again) == _digest(first)
    # one file changes: only its frame is compressed again, bytes equal a fresh build
    path = members[10][1]
    path.write_text("changed\n")
    members[10] = (members[10][0], path, 0o644, _digest(path))
    reused = tmp_path / "c.tar.zst"
    stats = write_tar(reused, members, 3, previous=again)
    fresh = tmp_path / "d.tar.zst"
    write_tar(fresh, members, 3)
    # (the last frame holds the end padding, which follows the total size)
    assert stats["reused"] >= stats["frames"] - 2 and _digest(reused) == _digest(fresh)
    names = [m.name for m, fh in iter_members(reused) if fh is not None]
    assert names == [m[0] for m in members]


def test_a_damaged_earlier_bundle_is_not_copied(tmp_path):
    members = _files(tmp_path / "src")
    first = tmp_path / "a.tar.zst"
    write_tar(first, members, 3)
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    out = tmp_path / "b.tar.zst"
    stats = write_tar(out, members, 3, previous=first)
    assert stats["reused"] == stats["frames"] - 1
    fresh = tmp_path / "c.tar.zst"
    write_tar(fresh, members, 3)
    assert _digest(out) == _digest(fresh)


def test_hash_cache_notices_a_change_and_skips_racy_files(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("one\n")
    old = time.time() - 60
    os.utime(path, (old, old))
    cache = HashCache(tmp_path / "cache.json")
    cache.now += 10 * 10**9  # ctime is "now" for a fresh file: pretend time passed
    assert cache.sha256("x.txt", path, path.stat()) == _digest(path)
    cache.save()
    path.write_text("two\n")  # same size; new ctime (and mtime)
    os.utime(path, (old, old))  # even with the old mtime back
    again = HashCache(tmp_path / "cache.json")
    assert again.sha256("x.txt", path, path.stat()) == _digest(path)
    assert "x.txt" not in again.new  # changed a moment ago: not trusted to the cache


def test_delta_from_project_files_equals_delta_from_the_bundle(tmp_path, home):
    project = tmp_path / "proj"
    (project / "code").mkdir(parents=True)
    for i in range(20):
        (project / "code" / f"m{i}.py").write_text(f"X = {i}\n" * (i + 1))
    out = subprocess.run([sys.executable, "-m", "remoteops", "build-bundle", "--json"],
                         cwd=project, capture_output=True, text=True, check=True)
    import json

    tar = Path(json.loads(out.stdout)["bundle"])
    manifest = load_manifest(tar.with_name(tar.name.replace(".tar.zst", ".manifest.json")))
    names = ["code/m3.py", "code/m11.py", "code/m7.py"]
    a = write_delta(tar, names, tmp_path / "a.tar.zst")
    b = write_delta(tar, names, tmp_path / "b.tar.zst", manifest=manifest, source_dir=project)
    assert _digest(a) == _digest(b)
    (project / "code" / "m3.py").write_text("changed since the build\n")
    c = write_delta(tar, names, tmp_path / "c.tar.zst", manifest=manifest, source_dir=project)
    assert _digest(c) == _digest(a)  # falls back to the bundle's own bytes
