"""A full deploy's staging starts its write-back while the large files still arrive.

The bundle holds its small files first (``bundle_tar.stream_order``). Once ``EarlyStage``
has staged them and the first large member comes, a ``syncfs`` of the staging's file
system starts in a thread, so the sync that must follow the last byte has little left to
write. These tests feed a real bundle tar into the part file in two steps, the second one
only after that sync was asked for, so they see the order itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest

from remoteops.common.bundle_tar import frames_index_path, write_tar
from remoteops.common.manifest import FileEntry, Manifest
from remoteops.server import early_stage
from remoteops.server.durable import SYNCFS_MIN_FILES
from remoteops.server.early_stage import EarlyStage


def _bundle(tmp_path, small: int) -> tuple:
    src = tmp_path / "src"
    src.mkdir()
    files = {f"pkg/f{i:03d}.py": f"print({i})\n".encode() * (i + 1) for i in range(small)}
    files["weights.bin"] = os.urandom(3 << 20)
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    tar = tmp_path / "b.tar.zst"
    write_tar(tar, [(f"files/{rel}", src / rel, 0o644) for rel in files])
    manifest = Manifest(project="p", version=1, content_id="c" * 64, created_at="now",
                        source_commit=None, source_dirty=None, toolkit_version="0",
                        toolkit_wheel={"name": "w.whl", "sha256": "0", "size": 0}, plugins=[],
                        files=[FileEntry(rel, len(data), 0o644, hashlib.sha256(data).hexdigest())
                               for rel, data in sorted(files.items())])
    large_frame = json.loads(frames_index_path(tar).read_text())["frames"][-1]["offset"]
    return files, tar.read_bytes(), manifest, large_frame


@pytest.mark.parametrize("small, early", [(SYNCFS_MIN_FILES + 6, True),
                                          (SYNCFS_MIN_FILES - 1, False)])
def test_the_small_files_are_written_back_before_the_large_one_arrives(tmp_path, monkeypatch,
                                                                       small, early):
    files, data, manifest, large_frame = _bundle(tmp_path, small)
    staging = tmp_path / "staging"
    synced = threading.Event()
    seen: dict = {}

    def recording_syncfs(folder):
        seen["folder"] = folder
        seen["staged"] = {str(p.relative_to(staging)): p.stat().st_size
                          for p in staging.rglob("*") if p.is_file()}
        synced.set()
        return True

    monkeypatch.setattr(early_stage, "syncfs", recording_syncfs)
    part = tmp_path / "upload.part"
    cut = large_frame + (64 << 10)  # every small file, the start of the large one
    part.write_bytes(data[:cut])
    stager = EarlyStage(manifest, sorted(files), part, staging)
    stager.grew()
    if early:  # asked for with every small file staged, while the large one still arrives
        assert synced.wait(30)
        assert seen["folder"] == staging
        large = seen["staged"].pop("weights.bin", 0)
        assert sorted(seen["staged"]) == sorted(rel for rel in files if rel != "weights.bin")
        assert large < len(files["weights.bin"])
    with open(part, "ab") as fh:
        fh.write(data[cut:])
    stager.grew()
    stager.complete()
    staged = stager.result(manifest, sorted(files))
    assert staged is not None
    assert {rel: path.read_bytes() for rel, path in staged.items()} == files
    assert synced.is_set() is early  # too few files for one syncfs: none is started early
    stager.discard()
