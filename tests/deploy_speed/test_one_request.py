"""The one-request redeploy over the real sshd: one channel, no SFTP, exactly the changed files.

Sessions are counted in sshd's own log (LogLevel VERBOSE): one "Starting session:
command" per command, "subsystem 'sftp'" per SFTP session.
"""

from __future__ import annotations

import json
import shutil
import re
from pathlib import Path

import pytest

from tests.conftest import ssh_alias, trust
from tests.test_deploy import ENV, as_json, expected_tree, make_project, tree

COMMAND = re.compile(r"Starting session: command for ")
SFTP = re.compile(r"Starting session: subsystem 'sftp'")


@pytest.fixture
def server_root(tmp_path) -> Path:
    return tmp_path / "server" / "proj"


@pytest.fixture
def deploy(cli, home, project, sshd_server, server_root):
    make_project(project)
    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)

    def run(*args, expect=0):
        mark = len(sshd_server.log())
        res = cli("deploy-bundle", "--host", "box", "--project-root", str(server_root), "--yes",
                  *args, env=ENV, timeout=300)
        assert res.returncode == expect, res.stdout + res.stderr
        log = sshd_server.log()[mark:]
        res.commands, res.sftp = len(COMMAND.findall(log)), len(SFTP.findall(log))
        return res

    return run


def ledger(server_root: Path) -> list[dict]:
    path = server_root / ".remoteops" / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_redeploy_is_one_command_without_sftp_and_applies_exactly_the_change(
        deploy, project, server_root):
    first = deploy("--json")
    assert (first.commands, first.sftp) == (1, 0)  # no record yet: the server plans, in it
    (project / "code" / "train.py").write_text("print('train v2')\n")
    res = deploy("--json")
    out = as_json(res)
    assert (res.commands, res.sftp) == (1, 0)
    assert out["plan"]["changed"] == ["code/train.py"] and out["plan"]["added"] == []
    assert out["applied"]["overwritten"] == 1 and out["applied"]["created"] == 0
    assert tree(server_root) == expected_tree(project)
    # backed up and journaled as any apply: the old file is in the backup, the ledger says so
    entry = ledger(server_root)[-1]
    assert entry["action"] == "apply" and entry["version"] == 2 and entry["overwritten"] == 1
    backup = server_root / ".remoteops" / "backups" / entry["backup"]
    assert (backup / "files" / "code" / "train.py").read_text() == "print('train')\n"
    assert not (server_root / ".remoteops" / "journal.json").exists()
    assert not list((server_root / ".remoteops" / "incoming").glob("*"))
    # the bytes sent: the changed file and the manifest delta, far less than the manifest
    manifest = next((project / "bundles").glob("*-v2.manifest.json")).stat().st_size
    assert out["sent_bytes"] < manifest


def test_a_noop_is_one_command_that_still_checks_the_disk(deploy, project, server_root):
    deploy()
    res = deploy("--json")
    assert (res.commands, res.sftp) == (1, 0) and as_json(res)["noop"]
    (server_root / "code" / "util.py").write_text("X = 'edited on the server'\n")
    res = deploy()
    assert "the server is not as last deployed from here (1 file(s) there differ" in res.stdout
    assert tree(server_root) == expected_tree(project)


def test_a_manifest_hash_mismatch_falls_back_to_the_full_path(deploy, project, server_root):
    deploy()
    # same content id, another field: the manifest rebuilt there is not the laptop's
    current = server_root / ".remoteops" / "current.json"
    data = json.loads(current.read_text())
    data["source_commit"] = "0" * 40
    current.write_text(json.dumps(data))
    (project / "code" / "util.py").write_text("X = 2\n")
    res = deploy("--json")
    out = as_json(res)
    assert (res.commands, res.sftp) == (2, 0)  # the refused stream; one request plans and applies
    assert out["plan"]["changed"] == ["code/util.py"]
    assert tree(server_root) == expected_tree(project)
    assert [e["action"] for e in ledger(server_root)] == ["apply", "apply"]
    assert deploy().commands == 1  # the record is current again


def test_a_full_deploy_of_mostly_new_files_streams_the_bundle(deploy, project, server_root):
    (project / "data" / "big.jsonl").write_text('{"text": "line"}\n' * 20_000)
    res = deploy("--json")
    out = as_json(res)
    assert (res.commands, res.sftp) == (1, 0)  # planned and applied by one request
    bundle = next((project / "bundles").glob("*-v1.tar.zst")).stat().st_size
    assert bundle < out["sent_bytes"] < bundle + 50_000
    assert tree(server_root) == expected_tree(project)
    assert not list((server_root / ".remoteops" / "incoming").glob("*"))


def test_without_a_record_the_plan_is_the_servers_and_only_the_change_travels(
        deploy, project, server_root):
    import shutil

    deploy()
    shutil.rmtree(project / "bundles" / ".deployed")  # another laptop, or a lost record
    (project / "code" / "util.py").write_text("X = 'from another laptop'\n")
    res = deploy("--json")
    out = as_json(res)
    assert (res.commands, res.sftp) == (1, 0)  # the server plans and applies, one request
    assert out["plan"]["changed"] == ["code/util.py"] and out["applied"]["overwritten"] == 1
    manifest = next((project / "bundles").glob("*-v2.manifest.json")).stat().st_size
    assert out["sent_bytes"] < manifest + 2_000  # the manifest and a delta, not the bundle
    assert tree(server_root) == expected_tree(project)
    assert not list((server_root / ".remoteops" / "incoming").glob("*"))
    assert deploy().commands == 1  # the record is back


def _big_text(n: int = 400) -> str:
    return "".join(f"line {i}: the quick brown fox {i * 7919 % 1000} jumps\n" for i in range(n))


def test_a_small_edit_travels_as_a_patch_against_the_servers_copy(deploy, project,
                                                                 server_root):
    (project / "data" / "notes.txt").write_text(_big_text())
    deploy()
    (project / "data" / "notes.txt").write_text(_big_text().replace("line 200:", "LINE 200:"))
    res = deploy("--json")
    out = as_json(res)
    assert (res.commands, res.sftp) == (1, 0) and out["applied"]["overwritten"] == 1
    size = (project / "data" / "notes.txt").stat().st_size  # ~19 KB, ~2 KB compressed
    assert out["sent_bytes"] < 1_200 < size
    assert tree(server_root) == expected_tree(project)


def test_a_patch_for_a_file_changed_on_the_server_falls_back(deploy, project, server_root):
    (project / "data" / "notes.txt").write_text(_big_text())
    deploy()
    (server_root / "data" / "notes.txt").write_text(_big_text().replace("line 1:", "edit 1:"))
    (project / "data" / "notes.txt").write_text(_big_text().replace("line 200:", "LINE 200:"))
    res = deploy()
    assert "the server is not as last deployed from here (1 file(s) there differ" in res.stdout
    assert (res.commands, res.sftp) == (2, 0)  # the refused stream; one request plans and applies
    assert tree(server_root) == expected_tree(project)


def test_a_server_wiped_behind_the_laptop_gets_the_whole_bundle_streamed(deploy, project,
                                                                        server_root):
    """The record says v1 is there, the root is gone: the refused redeploy is followed by
    one request that plans against the empty root and streams the whole bundle (no SFTP,
    no separate plan and apply commands)."""
    deploy()
    shutil.rmtree(server_root)
    (project / "code" / "train.py").write_text("print('after the wipe')\n")
    res = deploy("--json")
    out = as_json(res)
    assert (res.commands, res.sftp) == (2, 0)
    assert "the server is not as last deployed from here" in " ".join(out["events"])
    assert sorted(out["plan"]["added"]) == sorted(expected_tree(project))
    assert out["applied"]["created"] == len(expected_tree(project))
    assert tree(server_root) == expected_tree(project)
    assert deploy().commands == 1  # the record is current again
