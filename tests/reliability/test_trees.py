"""Trees on the server: type changes, long names, unsafe paths, disk space, fsync, hash
cache and links, through the real apply (the agent's code on real files, killed for real).

Most tests drive ``remoteops.server.apply.Project`` directly with bundles built here: the
items are about the tree on the server, not the transport.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from remoteops import __version__
from remoteops.server.apply import Project
from remoteops.common.paths import link_digest
from remoteops.common.bundle_tar import write_tar
from remoteops.common.manifest import FileEntry, Manifest, content_id
from remoteops.common.errors import RemoteOpsError
from tests.test_deploy import deploy, server_root  # noqa: F401 - fixtures: a deploy over sshd

WHEEL = {"name": "remoteops-0-py3-none-any.whl", "sha256": "0" * 64, "size": 0}


def make_bundle(folder: Path, version: int, files: dict,
                modes: dict | None = None) -> tuple[Manifest, Path, Path]:
    """A manifest, its delta tar (every file) and manifest file, from ``path -> bytes``
    (or ``("link", target)``), written under ``folder``; ``modes``: path -> mode (0o644)."""
    src = folder / f"src-v{version}"
    entries, members = [], []
    for rel, data in sorted(files.items()):
        if isinstance(data, tuple):
            target = data[1]
            raw = target.encode()
            entries.append(FileEntry(rel, len(raw), 0o777, link_digest(target), link=target))
            continue
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        mode = (modes or {}).get(rel, 0o644)
        entry = FileEntry(rel, len(data), mode, hashlib.sha256(data).hexdigest())
        entries.append(entry)
        members.append((f"files/{rel}", path, mode, entry.sha256))
    manifest = Manifest(project="p", version=version, content_id=content_id(entries, WHEEL, []),
                        created_at="2026-01-01T00:00:00Z",
                        source_commit=None, source_dirty=None, toolkit_version=__version__,
                        toolkit_wheel=WHEEL, plugins=[], files=entries)
    delta = folder / f"v{version}.tar.zst"
    write_tar(delta, members)
    manifest_path = folder / f"v{version}.manifest.json"
    manifest_path.write_text(manifest.to_json())
    return manifest, delta, manifest_path


def tree(root: Path) -> dict[str, object]:
    """Every file (bytes) and link (("link", target)) under root, but .remoteops/."""
    out: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(folder, root)
        if rel_dir.split(os.sep)[0] == ".remoteops":
            continue
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if rel.startswith(".remoteops/"):
                continue
            out[rel] = ("link", os.readlink(path)) if path.is_symlink() else path.read_bytes()
    return out


def agent(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remoteops.agent", *args, "--json"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def killed_apply(root: Path, manifest_path: Path, delta: Path, after: int = 1) -> None:
    """Run the agent's apply and SIGKILL it (for real) after ``after`` placed files."""
    res = agent("deploy-apply", "--root", str(root), "--manifest", str(manifest_path),
                "--delta", str(delta), env={"REMOTEOPS_TEST_KILL_AFTER_FILES": str(after)})
    assert res.returncode == -9, res.stderr
    assert (root / ".remoteops" / "journal.json").is_file()


def killed_rollback(root: Path, backup: str, after: int = 1) -> None:
    res = agent("rollback", "--root", str(root), "--backup", backup,
                env={"REMOTEOPS_TEST_KILL_AFTER_FILES": str(after)})
    assert res.returncode == -9, res.stderr
    assert (root / ".remoteops" / "journal.json").is_file()


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "server" / "proj"


# -- 1. a file becomes a folder and a folder becomes a file -----------------------------------

V1_TYPES = {"a": b"a is a file\n", "d/x": b"x in folder d\n", "d/y/z": b"deep\n", "keep": b"k\n"}
V2_TYPES = {"a/b": b"a is a folder now\n", "d": b"d is a file now\n", "keep": b"k\n"}


def test_type_changes_apply_roll_back_and_roll_forward(tmp_path, root):
    project = Project(root)
    m1, d1, _ = make_bundle(tmp_path, 1, V1_TYPES)
    m2, d2, _ = make_bundle(tmp_path, 2, V2_TYPES)
    project.apply(m1, d1, "test")
    assert tree(root) == V1_TYPES
    applied = project.apply(m2, d2, "test")
    assert tree(root) == V2_TYPES and not (root / ".remoteops" / "journal.json").exists()
    undo = project.rollback(applied["backup_name"], "test")
    assert undo["version"] == 1 and tree(root) == V1_TYPES
    project.rollback(undo["backup_name"], "test")
    assert tree(root) == V2_TYPES
    assert project.current().version == 2


@pytest.mark.parametrize("after", [1, 2])
def test_killed_type_change_is_undone_and_then_applies(tmp_path, root, after):
    project = Project(root)
    m1, d1, _ = make_bundle(tmp_path, 1, V1_TYPES)
    m2, d2, p2 = make_bundle(tmp_path, 2, V2_TYPES)
    project.apply(m1, d1, "test")
    killed_apply(root, p2, d2, after)  # after 1: half placed; after 2: placed, not recorded
    assert tree(root) != V1_TYPES
    assert project.recover()["undone"] == "apply"
    assert tree(root) == V1_TYPES
    project.apply(m2, d2, "test")
    assert tree(root) == V2_TYPES


def test_killed_rollback_across_a_type_change_is_undone(tmp_path, root):
    project = Project(root)
    m1, d1, _ = make_bundle(tmp_path, 1, V1_TYPES)
    m2, d2, _ = make_bundle(tmp_path, 2, V2_TYPES)
    project.apply(m1, d1, "test")
    applied = project.apply(m2, d2, "test")
    killed_rollback(root, applied["backup_name"], 2)
    assert tree(root) not in (V1_TYPES, V2_TYPES)
    # the next command (here a rollback) finishes the undo first, then does its own work
    project.rollback(applied["backup_name"], "test")
    assert tree(root) == V1_TYPES


def test_a_folder_holding_unmanaged_files_is_refused_before_anything_changes(tmp_path, root):
    project = Project(root)
    m1, d1, _ = make_bundle(tmp_path, 1, V1_TYPES)
    m2, d2, _ = make_bundle(tmp_path, 2, V2_TYPES)
    project.apply(m1, d1, "test")
    (root / "d" / "mine.txt").write_text("the user's own file\n")
    before = tree(root)
    with pytest.raises(RemoteOpsError, match=r"d is a folder on the server holding d/mine.txt.*"
                                             r"Nothing was changed"):
        project.apply(m2, d2, "test")
    assert tree(root) == before and not (root / ".remoteops" / "journal.json").exists()


def test_recovery_is_never_stuck_on_files_written_into_a_half_made_folder(tmp_path, root):
    project = Project(root)
    m1, d1, _ = make_bundle(tmp_path, 1, V1_TYPES)
    m2, d2, p2 = make_bundle(tmp_path, 2, V2_TYPES)
    project.apply(m1, d1, "test")
    killed_apply(root, p2, d2, 2)  # a is a folder now, the journal says undo
    (root / "a" / "notes.txt").write_text("written by hand meanwhile\n")
    result = project.recover()
    assert tree(root) == V1_TYPES  # a is the file again
    [moved] = result["displaced"]
    assert (Path(moved) / "notes.txt").read_text() == "written by hand meanwhile\n"
    assert ".remoteops/displaced/" in moved


# -- 2. file names of 242 to 255 bytes ---------------------------------------------------------

LONG = "n" * 255
LONG_DIR = "d" * 250 + "/" + "é" * 120 + "x" * 15  # 255 bytes, two-byte characters too


def test_longest_names_deploy_roll_back_and_recover(tmp_path, root):
    project = Project(root)
    v1 = {LONG: b"one\n", LONG_DIR: b"deep one\n", "s" * 242: b"short\n"}
    v2 = {LONG: b"two\n", LONG_DIR: b"deep two\n", "s" * 242: b"short two\n"}
    m1, d1, _ = make_bundle(tmp_path, 1, v1)
    m2, d2, p2 = make_bundle(tmp_path, 2, v2)
    project.apply(m1, d1, "test")
    applied = project.apply(m2, d2, "test")
    assert tree(root) == v2
    undo = project.rollback(applied["backup_name"], "test")  # copies through temp names
    assert tree(root) == v1
    killed_rollback(root, undo["backup_name"], 1)
    assert project.recover()["undone"] == "rollback"
    assert tree(root) == v1
    killed_apply(root, p2, d2, 1)
    project.apply(m2, d2, "test")  # recovers first, then applies
    assert tree(root) == v2


def test_names_over_the_limit_are_refused_with_one_line(tmp_path, root):
    m, d, p = make_bundle(tmp_path, 1, {"ok": b"1\n"})
    data = json.loads(p.read_text())
    data["files"][0]["path"] = "x" * 256
    p.write_text(json.dumps(data))
    res = agent("deploy-apply", "--root", str(root), "--manifest", str(p), "--delta", str(d))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "longer than 255 bytes" in res.stderr and not (root / ("x" * 256)).exists()


# -- 5. member names and manifest paths that leave the root ------------------------------------

def _evil_bundle(tmp_path: Path, rel: str, payload: bytes = b"owned\n") -> tuple[Path, Path]:
    m, d, p = make_bundle(tmp_path, 1, {"ok": b"fine\n"})
    src = tmp_path / "payload"
    src.write_bytes(payload)
    entry = {"path": rel, "size": len(payload), "mode": 0o644,
             "sha256": hashlib.sha256(payload).hexdigest()}
    data = json.loads(p.read_text())
    data["files"].append(entry)
    p.write_text(json.dumps(data))
    write_tar(d, [("files/ok", tmp_path / "src-v1" / "ok", 0o644), (f"files/{rel}", src, 0o644)])
    return p, d


@pytest.mark.parametrize("rel", ["ABS", ".remoteops/current.json", "./.remoteops/ledger.jsonl",
                                 "x/../../escape.txt"])
def test_unsafe_manifest_paths_and_members_are_refused_before_staging(tmp_path, root, rel):
    victim = tmp_path / "victim.txt"
    rel = rel.replace("ABS", str(victim))  # member files//<abs path>: passed the old check
    p, d = _evil_bundle(tmp_path, rel)
    res = agent("deploy-apply", "--root", str(root), "--manifest", str(p), "--delta", str(d))
    assert res.returncode != 0 and "unsafe path" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not victim.exists() and not (tmp_path / "escape.txt").exists()
    assert not (root / ".remoteops" / "current.json").exists()
    assert not (root / "ok").exists()


# -- 7. disk space is checked on the uncompressed bytes, before staging ------------------------

@pytest.fixture
def small_disk(root):
    root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(root)], check=True)
    yield root
    subprocess.run(["umount", str(root)], check=False)


def test_compressible_bundle_larger_than_the_disk_is_refused_before_staging(tmp_path, small_disk):
    m, d, p = make_bundle(tmp_path, 1, {"zeros.bin": bytes(20 << 20), "small": b"s\n"})
    assert d.stat().st_size < 100_000  # the compressed upload fits easily
    res = agent("deploy-apply", "--root", str(small_disk), "--manifest", str(p), "--delta", str(d))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "not enough disk" in res.stderr and "Nothing was changed" in res.stderr
    assert tree(small_disk) == {}
    assert not (small_disk / ".remoteops" / "staging").exists()
    assert not (small_disk / ".remoteops" / "journal.json").exists()


def test_deploy_of_a_compressible_bundle_larger_than_the_disk_is_refused_before_upload(
        deploy, project, server_root):  # noqa: F811
    server_root.mkdir(parents=True)  # room for the upload and the headroom, not for the files
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(server_root)],
                   check=True)
    try:
        (project / "data" / "zeros.bin").write_bytes(bytes(40 << 20))
        res = deploy("deploy-bundle", "--yes", expect=2)
        assert "not enough disk" in res.stderr and "Nothing was changed" in res.stderr
        assert "Traceback" not in res.stderr and "Errno 28" not in res.stderr
        assert tree(server_root) == {}
        incoming = server_root / ".remoteops" / "incoming"
        assert not list(incoming.glob("*.tar.zst*"))  # refused before the upload
    finally:
        subprocess.run(["umount", str(server_root)], check=False)


# -- 8. durability: what the journal relies on is fsynced first --------------------------------

def test_backup_copies_staged_files_and_their_folders_are_fsynced_before_the_journal(
        tmp_path, root):
    strace = shutil.which("strace")
    if strace is None:  # tests/harness/install.py lists it; never silently weaker
        pytest.fail("strace is missing: apt-get install strace")
    project = Project(root)
    m1, d1, _ = make_bundle(tmp_path, 1, {"code/a.py": b"a1\n", "b.txt": b"b1\n"})
    m2, d2, p2 = make_bundle(tmp_path, 2, {"code/a.py": b"a2\n", "b.txt": b"b1\n",
                                           "new/c.txt": b"c2\n"})
    project.apply(m1, d1, "test")
    log = tmp_path / "strace.log"
    res = subprocess.run([strace, "-f", "-y", "-s", "4096", "-o", str(log), "-e",
                          "trace=fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat",
                          sys.executable, "-m", "remoteops.agent", "deploy-apply", "--root",
                          str(root), "--manifest", str(p2), "--delta", str(d2), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert tree(root) == {"code/a.py": b"a2\n", "b.txt": b"b1\n", "new/c.txt": b"c2\n"}
    lines = log.read_text().splitlines()
    state = f"{root}/.remoteops"
    journal = next(i for i, l in enumerate(lines)
                   if re.search(r"rename\w*\(.*\"" + re.escape(f"{state}/journal.json") + '"', l))
    done = next(i for i, l in enumerate(lines)
                if "unlink" in l and f"{state}/journal.json" in l)
    synced = [re.search(r"fsync\(\d+<([^>]*)>", l) for l in lines]
    before = {m.group(1) for m in synced[:journal] if m}
    between = {m.group(1) for m in synced[journal:done] if m}
    backup = project.list_backups()[-1]["path"]
    staging = [p for p in before if "/.remoteops/staging/" in p]
    assert {p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in staging
            if not os.path.isdir(p)} >= {"code/a.py", "new/c.txt"}, before
    assert any(p.endswith("/.remoteops/staging") or p.endswith("/staging/" + m2.content_id)
               for p in staging)
    assert f"{backup}/files/code/a.py" in before  # the copy itself
    assert f"{backup}/files/code" in before and f"{backup}/files" in before  # its folders
    assert f"{state}/backups" in before  # the backup's own name
    # after the files are placed and before the journal goes: the folders naming them
    assert {str(root), f"{root}/code", f"{root}/new"} <= between, between


# -- 9. the server's hash cache sees an edit that keeps size and mtime ---------------------------

def test_same_size_edit_with_preserved_mtime_is_restored_by_the_next_deploy(tmp_path, root):
    import time

    project = Project(root)
    m1, d1, _ = make_bundle(tmp_path, 1, {"conf.txt": b"alpha=1\n", "other": b"o\n"})
    project.apply(m1, d1, "test")
    target = root / "conf.txt"
    st = target.stat()
    time.sleep(0.05)  # beyond the kernel's coarse timestamp tick
    target.write_bytes(b"alpha=9\n")  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / touch -r leave it
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    plan = project.plan(m1)
    assert plan["changed"] == ["conf.txt"]
    result = project.apply(m1, d1, "test")
    assert not result["noop"] and target.read_bytes() == b"alpha=1\n"


# -- 10. links inside the project stay links ---------------------------------------------------

def test_links_inside_the_project_stay_links_through_deploy_and_rollback(
        deploy, project, server_root):  # noqa: F811
    (project / "code" / "latest.py").symlink_to("train.py")
    (project / "data_link").symlink_to("data")  # a link to a folder
    (project / "code" / "style.jsonl").symlink_to("../data/style.jsonl")
    res = deploy("deploy-bundle", "--yes")
    links = {"code/latest.py": "train.py", "data_link": "data",
             "code/style.jsonl": "../data/style.jsonl"}
    for rel, target in links.items():
        assert (server_root / rel).is_symlink() and os.readlink(server_root / rel) == target
    manifest = json.loads(next((project / "bundles").glob("*-v1.manifest.json")).read_text())
    assert {f["path"]: f["link"] for f in manifest["files"] if "link" in f} == links
    assert (server_root / "data_link" / "style.jsonl").read_text().startswith('{"instruction"')

    (project / "code" / "latest.py").unlink()
    (project / "code" / "latest.py").symlink_to("util.py")  # a link's target changes
    (project / "run.sh").unlink()
    (project / "run.sh").symlink_to("code/train.py")  # a file becomes a link
    res = deploy("deploy-bundle", "--yes", "--json")
    assert json.loads(res.stdout)["plan"]["changed"] == ["code/latest.py", "run.sh"]
    assert os.readlink(server_root / "code" / "latest.py") == "util.py"
    assert os.readlink(server_root / "run.sh") == "code/train.py"
    rows = json.loads(deploy("backups", "--json").stdout)
    deploy("rollback", rows[-1]["name"], "--yes")
    assert os.readlink(server_root / "code" / "latest.py") == "train.py"
    assert not (server_root / "run.sh").is_symlink()
    assert (server_root / "run.sh").read_text() == "#!/bin/sh\necho run\n"


@pytest.mark.parametrize("target", ["/etc/hostname", "../../outside.txt"])
def test_links_leaving_the_project_are_refused_in_one_line(deploy, project, server_root,
                                                           target):  # noqa: F811
    (project / "code" / "escape").symlink_to(target)
    res = deploy("deploy-bundle", "--yes", expect=2)
    assert f"code/escape is a link to '{target}'" in res.stderr and "bundle.exclude" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not server_root.exists() or tree(server_root) == {}


def test_link_entries_change_type_and_hostile_link_targets_are_refused(tmp_path, root):
    project = Project(root)
    v1 = {"a.txt": b"a\n", "l": ("link", "a.txt"), "dir/x": b"x\n"}
    v2 = {"a.txt": b"a\n", "l": b"l is a file now\n", "dir": ("link", "a.txt")}
    m1, d1, _ = make_bundle(tmp_path, 1, v1)
    m2, d2, _ = make_bundle(tmp_path, 2, v2)
    project.apply(m1, d1, "test")
    assert tree(root) == v1
    applied = project.apply(m2, d2, "test")
    assert tree(root) == v2
    project.rollback(applied["backup_name"], "test")
    assert tree(root) == v1
    for evil in ("../../../etc", "/etc", "../.remoteops"):
        m3, d3, p3 = make_bundle(tmp_path, 3, {"sub/l": ("link", evil)})
        res = agent("deploy-apply", "--root", str(root), "--manifest", str(p3), "--delta", str(d3))
        assert res.returncode != 0 and "unsafe path" in res.stderr and "Traceback" not in res.stderr
        assert tree(root) == v1
