"""Backups: ordered by sequence whatever the clock says, rollback to one that is not the
latest is exact, and tampered metadata cannot reach outside the root."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from remoteops.server.apply import Project
from remoteops.common.errors import RemoteOpsError
from remoteops.common.wire import parse_marked
from tests.reliability.test_trees import agent, make_bundle, tree

V1 = {"a.txt": b"a1\n", "keep.txt": b"k\n"}
V2 = {"a.txt": b"a2\n", "b.txt": b"b2\n", "keep.txt": b"k\n", "sub/x.txt": b"x2\n"}
V3 = {"a.txt": b"a3\n", "c.txt": b"c3\n", "keep.txt": b"k\n", "sub/y.txt": b"y3\n"}


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "server" / "proj"


def deployed(tmp_path: Path, root: Path, *versions: dict) -> tuple[Project, list[dict]]:
    project = Project(root)
    results = []
    for n, files in enumerate(versions, 1):
        manifest, delta, _ = make_bundle(tmp_path, n, files)
        results.append(project.apply(manifest, delta, "test"))
    return project, results


# -- 3. rollback to a backup that is not the latest ---------------------------------------------

def test_rollback_to_an_older_backup_walks_back_exactly(tmp_path, root):
    project, (b1, b2, b3) = deployed(tmp_path, root, V1, V2, V3)
    assert tree(root) == V3
    result = project.rollback(b2["backup_name"], "test")
    assert result["version"] == 1
    assert tree(root) == V1  # not a mix: c.txt and sub/y.txt (made by v3) are gone too
    assert result["walked_back"] == [b3["backup_name"]]
    assert project.current().version == 1
    # and that rollback is itself one backup: undoing it returns to v3 exactly
    project.rollback(result["backup_name"], "test")
    assert tree(root) == V3 and project.current().version == 3


def test_dry_run_of_a_walk_back_lists_what_it_restores_and_removes(tmp_path, root):
    project, (_, b2, b3) = deployed(tmp_path, root, V1, V2, V3)
    plan = project.rollback_plan(b2["backup_name"])
    assert plan["to_version"] == 1 and plan["through"] == [b3["backup_name"]]
    assert plan["restore"] == ["a.txt"]
    assert plan["remove"] == ["b.txt", "c.txt", "sub/x.txt", "sub/y.txt"]
    assert tree(root) == V3


def test_rollback_to_the_first_backup_through_the_cli_empties_the_root(tmp_path, root):
    project, (b1, _, _) = deployed(tmp_path, root, V1, V2, V3)
    res = agent("rollback", "--root", str(root), "--backup", b1["backup_name"])
    assert res.returncode == 0, res.stderr
    assert tree(root) == {} and project.current() is None


def test_a_broken_chain_is_refused_naming_the_backup_to_roll_back_first(tmp_path, root):
    project, (b1, b2, b3) = deployed(tmp_path, root, V1, V2, V3)
    meta_path = Path(b3["backup"]) / "backup.json"
    meta = json.loads(meta_path.read_text())
    meta["manifest_before"]["content_id"] = "f" * 64  # v3 did not start where v2 left off
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RemoteOpsError, match=f"roll back to {b3['backup_name']} first"):
        project.rollback(b2["backup_name"], "test")
    assert tree(root) == V3


# -- 4. paths in backup metadata are checked like tar members ------------------------------------

@pytest.mark.parametrize("field", ["created", "deleted"])
def test_tampered_backup_metadata_cannot_touch_files_outside_the_root(tmp_path, root, field):
    project, (_, b2) = deployed(tmp_path, root, V1, V2)
    victim = root.parent / "victim.txt"
    victim.write_text("not yours\n")
    meta_path = Path(b2["backup"]) / "backup.json"
    meta = json.loads(meta_path.read_text())
    if field == "created":
        meta["created"].append("../victim.txt")
    else:
        meta["deleted"].append({"path": "../victim.txt", "sha256": "0" * 64, "size": 1,
                                "mode": 0o644})
    meta_path.write_text(json.dumps(meta))
    res = agent("rollback", "--root", str(root), "--backup", b2["backup_name"])
    assert res.returncode != 0 and "unsafe path '../victim.txt'" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert victim.read_text() == "not yours\n" and tree(root) == V2
    res = agent("rollback", "--root", str(root), "--backup", b2["backup_name"], "--dry-run")
    assert res.returncode != 0 and "unsafe path" in res.stderr


def test_a_tampered_journal_cannot_point_recovery_outside_the_backups(tmp_path, root):
    project, _ = deployed(tmp_path, root, V1)
    outside = root.parent / "fake"
    (outside).mkdir()
    (outside / "backup.json").write_text(json.dumps(
        {"kind": "apply", "label": "x", "overwritten": [], "deleted": [],
         "created": ["keep.txt"], "manifest_before": None}))
    (root / ".remoteops" / "journal.json").write_text(json.dumps({"backup": "../../../fake"}))
    with pytest.raises(RemoteOpsError, match="unsafe path"):
        project.recover()
    assert tree(root) == V1


# -- 6. order by sequence, not by the clock ------------------------------------------------------

def test_a_rollback_in_the_same_second_as_its_deploy_is_the_current_backup(tmp_path, root):
    project = Project(root)
    m1, d1, _ = make_bundle(tmp_path, 1, V1)
    m2, d2, _ = make_bundle(tmp_path, 2, V2)
    project.apply(m1, d1, "test")
    for _ in range(5):  # two real changes within one wall-clock second
        time.sleep(1 - time.time() % 1 + 0.01)
        applied = project.apply(m2, d2, "test")
        undo = project.rollback(applied["backup_name"], "test")
        if applied["backup_name"][:16] == undo["backup_name"][:16]:
            break
        project.apply(m1, d1, "test")
    assert applied["backup_name"][:16] == undo["backup_name"][:16]
    rows = project.list_backups()
    assert rows[-1]["name"] == undo["backup_name"] and rows[-1]["current"]
    assert rows[-1]["kind"] == "rollback"
    res = agent("backups", "--root", str(root))
    listed = parse_marked(res.stdout)["backups"]  # what 'invoke backups' shows
    assert [r["name"] for r in listed if r["current"]] == [undo["backup_name"]]
    assert project.prune(1) and [r["name"] for r in project.list_backups()] == [undo["backup_name"]]


def test_a_clock_stepped_back_does_not_prune_the_newest_backup(tmp_path, root):
    project, (b1,) = deployed(tmp_path, root, V1)
    # the clock was ahead when v1 was deployed (then NTP stepped it back): its name carries
    # a stamp later than anything written from now on
    old = Path(b1["backup"])
    future = old.with_name(re.sub(r"^\d{8}T\d{6}Z", "20991231T235959Z", old.name))
    old.rename(future)
    m2, d2, _ = make_bundle(tmp_path, 2, V2)
    applied = Project(root).apply(m2, d2, "test", keep=1)
    assert applied["pruned"] == [future.name]  # the oldest, whatever its stamp says
    assert Path(applied["backup"]).is_dir()  # the "undo with" the user was just shown
    rows = project.list_backups()
    assert [r["name"] for r in rows] == [applied["backup_name"]] and rows[-1]["current"]
    project.rollback(applied["backup_name"], "test")
    assert tree(root) == V1
