"""New folders are moved into place whole (one rename each), with every file's mode, and
an apply killed right after such a rename is undone like any other."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from remoteops.server.apply import Project
from remoteops.server.applyplan import Put, fresh_folders
from tests.reliability.test_trees import agent, killed_apply, make_bundle, tree

V1 = {"keep.txt": b"k\n", "old/a.py": b"a\n"}
V2 = {"keep.txt": b"k\n", "old/a.py": b"a\n", "old/new/b.py": b"b\n", "run.sh": b"#!/bin/sh\n",
      "src/pkg/c.py": b"c\n", "src/pkg/deep/d.py": b"d\n", "src/tool": b"#!/bin/sh\n",
      "src/link": ("link", "pkg/c.py"), "docs/x.md": b"x\n", "docs/sub/y.md": b"y\n"}
MODES = {"run.sh": 0o755, "src/tool": 0o750, "src/pkg/deep/d.py": 0o600}


def modes(root: Path) -> dict[str, int]:
    return {rel: stat.S_IMODE(os.lstat(root / rel).st_mode) for rel, data in V2.items()
            if not isinstance(data, tuple)}


def test_new_folders_are_renamed_whole_with_every_mode_and_the_rest_file_by_file(
        tmp_path, monkeypatch):
    root = tmp_path / "server" / "proj"
    project = Project(root)
    m1, d1, _ = make_bundle(tmp_path, 1, V1)
    project.apply(m1, d1, "test")
    m2, d2, _ = make_bundle(tmp_path, 2, V2, MODES)
    renamed, replaced = [], []
    real_rename, real_replace = os.rename, os.replace
    monkeypatch.setattr(os, "rename", lambda a, b: (renamed.append(Path(b)),
                                                    real_rename(a, b))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append(Path(b)),
                                                     real_replace(a, b))[1])
    project.apply(m2, d2, "test")
    assert tree(root) == V2
    assert modes(root) == {rel: MODES.get(rel, 0o644) for rel in modes(root)}
    # src/ and docs/ are new: one rename each; old/new/ is new inside a kept folder
    assert sorted(p for p in renamed if root in p.parents) == [root / "docs", root / "old/new",
                                                               root / "src"]
    placed = {p.relative_to(root).as_posix() for p in replaced if root in p.parents
              and ".remoteops" not in p.parts}
    assert placed == {"run.sh", "src/link"}  # in the root, and a link (never staged)


def test_a_staging_folder_holding_anything_else_is_placed_file_by_file(tmp_path):
    root, staging = tmp_path / "root", tmp_path / "staging"
    root.mkdir()
    for rel in ("a/x", "a/y", "b/z"):
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(b"1")
    changes = {rel: Put(staging / rel, 0o644, move=True) for rel in ("a/x", "a/y", "b/z")}
    assert fresh_folders(root, sorted(changes), changes) == {
        "a": (staging / "a", ["a/x", "a/y"]), "b": (staging / "b", ["b/z"])}
    (staging / "a" / "extra").write_bytes(b"not in the change")
    os.symlink("z", staging / "b" / "link")
    assert fresh_folders(root, sorted(changes), changes) == {}
    (root / "b").mkdir()  # an existing folder is never replaced
    os.unlink(staging / "b" / "link")
    assert fresh_folders(root, sorted(changes), changes) == {}
    os.unlink(staging / "a" / "extra")
    assert fresh_folders(root, sorted(changes), changes) == {"a": (staging / "a", ["a/x", "a/y"])}
    moved_elsewhere = {**changes, "a/x": Put(tmp_path / "other" / "a/x", 0o644, move=True)}
    assert fresh_folders(root, sorted(changes), moved_elsewhere) == {}


def test_an_apply_killed_after_a_whole_folder_rename_is_undone(tmp_path):
    root = tmp_path / "server" / "proj"
    Project(root).apply(*make_bundle(tmp_path, 1, V1)[:2], "test")
    m2, d2, manifest2 = make_bundle(tmp_path, 2, V2, MODES)
    killed_apply(root, manifest2, d2, after=1)  # SIGKILL after the first folder's rename
    assert (root / "docs").is_dir() or (root / "old" / "new").is_dir() or (root / "src").is_dir()
    res = agent("recover", "--root", str(root))
    assert res.returncode == 0, res.stderr
    assert tree(root) == V1 and not (root / ".remoteops" / "journal.json").exists()
    assert not any((root / d).exists() for d in ("docs", "src", "old/new"))
    Project(root).apply(m2, d2, "test")
    assert tree(root) == V2 and modes(root)["src/tool"] == 0o750


def test_the_scan_skips_missing_folders_and_still_finds_every_file(tmp_path, monkeypatch):
    root = tmp_path / "root"
    for rel in ("kept/a.txt", "kept/deep/b.txt", "top.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    (root / "file_not_folder").write_bytes(b"x")
    os.symlink("kept", root / "via_link")
    asked = ["gone/x.txt", "gone/y.txt", "gone/z.txt", "kept/a.txt", "kept/deep/b.txt",
             "kept/deep/missing.txt", "file_not_folder/inner.txt", "top.txt", "via_link/a.txt"]
    looked: list[str] = []
    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):
        looked.append(os.path.relpath(path, root))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", lstat)
    found = Project(root).scan(asked)
    monkeypatch.undo()
    assert set(found.hashes) == {"kept/a.txt", "kept/deep/b.txt", "top.txt", "via_link/a.txt"}
    assert found.hashes["via_link/a.txt"] == found.hashes["kept/a.txt"]
    assert [p for p in looked if p.startswith("gone/")] == ["gone/x.txt"]  # then the folder
