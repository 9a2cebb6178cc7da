"""A first bundle is compressed while its files are still hashed (``build.EarlyTar``): the
same bytes and frame keys as a bundle written after the hashing, and a build that fails
half-way leaves nothing behind."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path

import pytest

from remoteops.common.bundle_tar import frames_index_path
from remoteops.common.config import load_settings
from remoteops.laptop import build as build_module
from remoteops.laptop.build import build_bundle
from tests.test_deploy import make_project


def _project(root: Path) -> Path:
    root.mkdir(parents=True)
    make_project(root)
    rng = random.Random(5)
    for i in range(120):
        path = root / "src" / f"pkg{i // 30}" / f"m{i:03d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"v{j} = {rng.random()}\n" for j in range(rng.randint(3, 80))))
    (root / "data" / "weights.bin").write_bytes(rng.randbytes(3 << 20))
    old = 1_600_000_000  # settled long ago: the hashes are cached at these stats
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
    return root


def _keys(tar: Path) -> list:
    return [f["key"] for f in json.loads(frames_index_path(tar).read_text())["frames"]]


def test_a_first_bundle_compressed_while_hashed_is_the_same_bundle(tmp_path, home):
    early_dir = _project(tmp_path / "a")
    shutil.copytree(early_dir, tmp_path / "b", copy_function=shutil.copy2)
    started = []
    original = build_module.EarlyTar.__init__

    def spy(self, *args, **kwargs):
        started.append(threading.current_thread().name)
        original(self, *args, **kwargs)

    build_module.EarlyTar.__init__ = spy
    try:
        early = build_bundle(load_settings(early_dir), background=True).wait()
        assert started  # the tar was begun before the hashes were known
        started.clear()
        later = build_bundle(load_settings(tmp_path / "b"), background=False)
        assert not started
    finally:
        build_module.EarlyTar.__init__ = original
    assert early.manifest.content_id == later.manifest.content_id
    assert early.tar_path.read_bytes() == later.tar_path.read_bytes()
    assert early.manifest_path.read_text() == early.manifest.to_json()
    keys = _keys(early.tar_path)
    assert keys == _keys(later.tar_path) and all(keys)  # every frame reusable next time
    # the next build reuses them: one file changed, the rest copied
    (early_dir / "src" / "pkg0" / "m000.py").write_text("changed = 1\n")
    again = build_bundle(load_settings(early_dir), background=True).wait()
    assert again.manifest.version == 2
    assert sum(k is not None for k in _keys(again.tar_path)) == len(keys)


def test_a_first_build_that_fails_while_hashing_leaves_nothing(tmp_path, home, monkeypatch):
    project = _project(tmp_path / "p")
    real = build_module.HashCache.sha256
    seen = []

    def failing(self, rel, path, st):
        seen.append(rel)
        if len(seen) == 60:
            raise OSError(f"cannot read {rel}")
        return real(self, rel, path, st)

    monkeypatch.setattr(build_module.HashCache, "sha256", failing)
    with pytest.raises(OSError, match="cannot read"):
        build_bundle(load_settings(project), background=True)
    assert [t for t in threading.enumerate() if t.name == "remoteops-early-tar"] == []
    left = sorted(p.name for p in (project / "bundles").iterdir() if p.is_file())
    assert not [name for name in left if ".tar" in name or ".manifest" in name], left
