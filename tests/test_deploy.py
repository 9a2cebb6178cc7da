"""build-bundle / deploy-bundle / rollback / backups against the real sshd."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import ssh_alias, trust

ENV = {"REMOTEOPS_REMOTE_PYTHON": sys.executable}


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root, ignoring remoteops' own state folder."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(".remoteops/"):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def make_project(folder: Path) -> None:
    (folder / "code").mkdir()
    (folder / "data").mkdir()
    (folder / "code" / "train.py").write_text("print('train')\n")
    (folder / "code" / "util.py").write_text("X = 1\n")
    (folder / "data" / "style.jsonl").write_text('{"instruction": "q", "output": "a"}\n' * 50)
    (folder / "run.sh").write_text("#!/bin/sh\necho run\n")
    (folder / "run.sh").chmod(0o755)
    (folder / ".gitignore").write_text("*.log\nscratch/\n")
    (folder / "debug.log").write_text("noise\n")
    (folder / "scratch").mkdir()
    (folder / "scratch" / "tmp.txt").write_text("x\n")
    (folder / ".env").write_text("HF_TOKEN=do-not-ship\n")
    (folder / "outputs").mkdir()
    (folder / "outputs" / "ckpt.bin").write_bytes(os.urandom(1000))


@pytest.fixture
def server_root(tmp_path) -> Path:
    return tmp_path / "server" / "proj"


@pytest.fixture
def deploy(cli, home, project, sshd_server, server_root):
    """Run a deploy-family task against the sshd as root, with --json where it helps."""
    make_project(project)
    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)

    def run(task, *args, host="box", env=None, expect=0):
        res = cli(task, "--host", host, "--project-root", str(server_root), *args,
                  env=dict(ENV, **(env or {})), timeout=300)
        if expect is not None:
            assert res.returncode == expect, res.stdout + res.stderr
        return res

    return run


def as_json(res):
    return json.loads(res.stdout)


def expected_tree(project: Path) -> dict[str, str]:
    t = tree(project)
    return {p: h for p, h in t.items() if not p.startswith(("outputs/", "scratch/", "bundles/"))
            and p not in ("debug.log", ".env") and not p.startswith(".remoteops")}


def test_deploy_to_empty_root_is_byte_identical_and_dry_run_changes_nothing(
        deploy, project, server_root):
    res = deploy("deploy-bundle", "--dry-run")
    assert "4 added" not in res.stdout and "dry run: nothing was changed" in res.stdout
    assert "+ code/train.py" in res.stdout
    assert tree(server_root) == {}
    res = deploy("deploy-bundle", "--yes", "--json")
    out = as_json(res)
    assert out["applied"]["created"] == 5 and out["version"] == 1
    assert tree(server_root) == expected_tree(project)
    assert (server_root / "run.sh").stat().st_mode & 0o777 == 0o755
    assert not (server_root / ".env").exists() and not (server_root / "debug.log").exists()
    # the server keeps a manifest of what is deployed, the ledger and the backup
    ledger = (server_root / ".remoteops" / "ledger.jsonl").read_text().splitlines()
    assert json.loads(ledger[-1])["action"] == "apply"
    assert Path(out["applied"]["backup"]).is_dir()


def test_redeploy_sends_only_the_changes_and_rollback_restores_the_old_tree(
        deploy, project, server_root):
    deploy("deploy-bundle", "--yes")
    before = tree(server_root)
    (project / "code" / "train.py").write_text("print('train v2')\n")
    (project / "code" / "new.py").write_text("NEW = True\n")
    (project / "code" / "util.py").unlink()
    res = deploy("deploy-bundle", "--dry-run")
    assert "1 added, 1 changed, 1 deleted, 3 unchanged" in res.stdout
    out = as_json(deploy("deploy-bundle", "--yes", "--json"))
    assert out["plan"]["added"] == ["code/new.py"] and out["plan"]["changed"] == ["code/train.py"]
    assert out["plan"]["delete"] == ["code/util.py"]
    manifest_size = len(next((project / "bundles").glob("*-v2.manifest.json")).read_bytes())
    assert out["sent_bytes"] < manifest_size + 2000  # the manifest plus two tiny files
    assert tree(server_root) == expected_tree(project)

    rows = as_json(deploy("backups", "--json"))
    assert [r["current"] for r in rows] == [False, True] and rows[-1]["version"] == 2
    res = deploy("rollback", rows[-1]["name"], "--yes")
    assert "rolled back to v1" in res.stdout and "verified by hash" in res.stdout
    assert tree(server_root) == before
    assert (server_root / "code" / "util.py").exists() and not (server_root / "code" / "new.py").exists()
    # the rollback was itself backed up: rolling that back returns to v2
    rows = as_json(deploy("backups", "--json"))
    assert rows[-1]["kind"] == "rollback"
    deploy("rollback", rows[-1]["name"], "--yes")
    assert tree(server_root) == expected_tree(project)


def test_noop_redeploy_sends_only_the_manifest_hash(deploy, project):
    deploy("deploy-bundle", "--yes")
    out = as_json(deploy("deploy-bundle", "--yes", "--json"))
    assert out["noop"] and out["applied"] is None
    manifest = next((project / "bundles").glob("*-v1.manifest.json"))
    assert 0 < out["sent_bytes"] < len(manifest.read_bytes()) // 2  # the header, no manifest
    assert not list((project / "bundles").glob("*-v2*"))  # nothing changed: no new version


def test_upload_resumes_after_a_cut_connection(deploy, project, server_root, sshd_server):
    from tests.harness.proxy import CutProxy

    (project / "data" / "big.bin").write_bytes(os.urandom(6_000_000))
    proxy = CutProxy((sshd_server.host, sshd_server.port))
    known = project / ".remoteops" / "known_hosts"
    known.write_text(known.read_text() + sshd_server.known_hosts_line.replace(
        f"]:{sshd_server.port} ", f"]:{proxy.port} "))
    host = f"root@127.0.0.1:{proxy.port}"
    env = {"REMOTEOPS_SSH__CONNECT_RETRIES": "0"}
    (project / "remoteops.toml").write_text(
        f'[hosts.viaproxy]\nhost = "{host}"\nidentity_file = "{sshd_server.client_key}"\n')
    try:
        proxy.arm(4_500_000)
        res = deploy("deploy-bundle", "--yes", host="viaproxy", env=env, expect=3)
        assert "broke during the upload" in res.stderr and "resumes" in res.stderr
        assert proxy.cuts == 1
        assert tree(server_root) == {}  # nothing applied
        parts = list((server_root / ".remoteops" / "incoming").glob("*.part"))
        # pipelined writes in flight at the cut are lost; what reached the disk is kept
        assert len(parts) == 1 and 100_000 < parts[0].stat().st_size < 6_000_000
        already = parts[0].stat().st_size
        out = as_json(deploy("deploy-bundle", "--yes", "--json", host="viaproxy", env=env))
    finally:
        proxy.close()
    bundle = next((project / "bundles").glob("*-v1.tar.zst"))  # the upload: the whole bundle
    assert out["sent_bytes"] < bundle.stat().st_size - already + 10_000
    assert tree(server_root) == expected_tree(project)


def test_killed_apply_is_undone_by_the_next_deploy(deploy, project, server_root):
    deploy("deploy-bundle", "--yes")
    old = tree(server_root)
    for name in ("train.py", "util.py"):
        (project / "code" / name).write_text(f"# changed {name}\n")
    (project / "code" / "extra.py").write_text("E = 1\n")
    # the agent runs on this machine through the local target, which passes the
    # environment on: it SIGKILLs itself after placing one of three files
    res = deploy("deploy-bundle", "--yes", host="local",
                 env={"REMOTEOPS_TEST_KILL_AFTER_FILES": "1"}, expect=2)
    assert "exit -9" in res.stderr or "exit 137" in res.stderr
    half = tree(server_root)
    assert half != old and half != expected_tree(project)  # really half-applied
    assert (server_root / ".remoteops" / "journal.json").exists()
    res = deploy("deploy-bundle", "--yes")
    assert "recovered first: undid an interrupted apply (v2)" in res.stdout
    assert tree(server_root) == expected_tree(project)
    assert not (server_root / ".remoteops" / "journal.json").exists()
    ledger = [json.loads(l)["action"] for l in
              (server_root / ".remoteops" / "ledger.jsonl").read_text().splitlines()]
    assert ledger == ["apply", "recover", "apply"]


def test_killed_apply_is_undone_by_rollback(deploy, project, server_root):
    deploy("deploy-bundle", "--yes")
    old = tree(server_root)
    (project / "code" / "train.py").write_text("# v2\n")
    (project / "run.sh").write_text("# v2\n")
    deploy("deploy-bundle", "--yes", host="local", env={"REMOTEOPS_TEST_KILL_AFTER_FILES": "1"},
           expect=2)
    first = as_json(deploy("backups", "--json"))[0]["name"]
    res = deploy("rollback", first, "--yes")
    assert "undid an interrupted apply" in res.stdout
    assert tree(server_root) == {}  # rolled back past v1: the root held nothing
    assert old  # and v1 had files


def _hold_lock(server_root: Path, pid: int) -> Path:
    lock = server_root / ".remoteops" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"holder": "deploy v7 by ana@laptop", "host": socket.gethostname(),
                                "pid": pid, "time": "2026-11-24T01:00:00Z"}))
    return lock


def test_locked_root_refuses_and_a_dead_holder_lock_is_broken(deploy, project, server_root):
    deploy("deploy-bundle", "--yes")
    (project / "code" / "train.py").write_text("# v2\n")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        lock = _hold_lock(server_root, sleeper.pid)
        before = tree(server_root)
        res = deploy("deploy-bundle", "--yes", expect=2)
        assert "locked by deploy v7 by ana@laptop" in res.stderr and str(sleeper.pid) in res.stderr
        assert tree(server_root) == before and lock.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    res = deploy("deploy-bundle", "--yes")  # the holder is dead now: the lock is stale
    assert "broke a stale lock left by deploy v7 by ana@laptop" in res.stdout
    assert tree(server_root) == expected_tree(project) and not lock.exists()


def _bundle(deploy, project) -> Path:
    out = subprocess.run([sys.executable, "-m", "remoteops", "build-bundle", "--json"],
                         cwd=project, capture_output=True, text=True, check=True)
    return Path(json.loads(out.stdout)["bundle"])


def test_tampered_truncated_and_unsafe_bundles_are_refused(deploy, project, server_root):
    deploy("deploy-bundle", "--yes")
    before = tree(server_root)
    (project / "code" / "train.py").write_text("print('v2')\n" * 100)
    good = _bundle(deploy, project)
    raw = good.read_bytes()

    flipped = good.with_name("flipped.tar.zst")
    data = bytearray(raw)
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    shutil.copy(good.with_name(good.name.replace(".tar.zst", ".manifest.json")),
                flipped.with_name("flipped.manifest.json"))
    truncated = good.with_name("cut.tar.zst")
    truncated.write_bytes(raw[: len(raw) * 2 // 3])
    shutil.copy(flipped.with_name("flipped.manifest.json"), truncated.with_name("cut.manifest.json"))
    for bad in (flipped, truncated):
        res = deploy("deploy-bundle", "--bundle", str(bad), "--yes", expect=2)
        assert "rebuild" in res.stderr and "Traceback" not in res.stderr
        assert tree(server_root) == before

    # a bundle with a ../ member, its manifest made consistent with it
    evil = good.with_name("evil.tar.zst")
    import zstandard

    payload = b"owned\n"
    with open(evil, "wb") as raw_out, zstandard.ZstdCompressor().stream_writer(raw_out) as zw, \
            tarfile.open(fileobj=zw, mode="w|") as tar:
        info = tarfile.TarInfo("files/../../escape.txt")
        info.size = len(payload)
        import io

        tar.addfile(info, io.BytesIO(payload))
    shutil.copy(flipped.with_name("flipped.manifest.json"), evil.with_name("evil.manifest.json"))
    res = deploy("deploy-bundle", "--bundle", str(evil), "--yes", expect=2)
    assert "unsafe path" in res.stderr
    assert tree(server_root) == before
    assert not (server_root.parent / "escape.txt").exists()


def test_same_sources_give_the_same_content_id(project, tmp_path, home):
    make_project(project)

    def build(folder):
        out = subprocess.run([sys.executable, "-m", "remoteops", "build-bundle", "--json"],
                             cwd=folder, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    first = build(project)
    shutil.rmtree(project / "bundles")
    second = build(project)
    assert first["content_id"] == second["content_id"] and second["version"] == 1
    first_bytes = hashlib.sha256(Path(second["bundle"]).read_bytes()).hexdigest()
    copy = tmp_path / "elsewhere" / project.name
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns("bundles"))
    os.utime(copy / "code" / "train.py", (0, 0))  # times do not matter, content does
    again = build(copy)
    assert again["content_id"] == first["content_id"]
    assert hashlib.sha256(Path(again["bundle"]).read_bytes()).hexdigest() == first_bytes
    (copy / "code" / "train.py").write_text("print('changed')\n")
    changed = build(copy)
    assert changed["content_id"] != first["content_id"] and changed["version"] == 2
    assert sorted(first["plugins"]) == first["plugins"] and "gpu_gate==0.1.0" in first["plugins"]


def test_non_interactive_deploy_without_yes_refuses(deploy, server_root):
    res = deploy("deploy-bundle", expect=2)
    assert "add --yes" in res.stderr
    assert not server_root.exists() or tree(server_root) == {}
    deploy("deploy-bundle", env={"TRAIN_SYNC_ASSUME_YES": "1"})


def test_old_backups_are_pruned(deploy, project, server_root):
    for i in range(4):
        (project / "code" / "train.py").write_text(f"# v{i}\n")
        deploy("deploy-bundle", "--yes", env={"REMOTEOPS_DEPLOY__KEEP_BACKUPS": "2"})
    rows = as_json(deploy("backups", "--json"))
    assert [r["version"] for r in rows] == [3, 4]


def test_full_disk_is_refused_before_upload(deploy, project, server_root):
    server_root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(server_root)],
                   check=True)
    try:
        (project / "data" / "big.bin").write_bytes(os.urandom(4_000_000))
        res = deploy("deploy-bundle", "--yes", expect=2)
        assert "not enough disk" in res.stderr and "Nothing was changed" in res.stderr
        assert tree(server_root) == {}
    finally:
        subprocess.run(["umount", str(server_root)], check=False)
