"""The redeploy fast path: one agent command when the laptop knows what the server has.

The laptop records what it deployed; the next deploy plans locally, uploads over SFTP
and runs a single ``deploy-apply --expect-base``. When the server is not that base
(files edited by hand, a rollback from elsewhere) it changes nothing and the deploy
plans against the server as before. Commands are counted in sshd's own log
(LogLevel VERBOSE logs one "Starting session: command" per exec; SFTP is a subsystem).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ssh_alias, trust
from tests.test_deploy import ENV, as_json, expected_tree, make_project, tree

COMMAND = re.compile(r"Starting session: command for ")


@pytest.fixture
def deploy(cli, home, project, sshd_server, server_root):
    """A deploy-family task against the sshd as root; ``.commands`` counts SSH commands."""
    make_project(project)
    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)

    def run(task, *args, env=None, expect=0):
        mark = len(sshd_server.log())
        res = cli(task, "--host", "box", "--project-root", str(server_root), *args,
                  env=dict(ENV, **(env or {})), timeout=300)
        if expect is not None:
            assert res.returncode == expect, res.stdout + res.stderr
        res.commands = len(COMMAND.findall(sshd_server.log()[mark:]))
        return res

    return run


@pytest.fixture
def server_root(tmp_path) -> Path:
    return tmp_path / "server" / "proj"


def ledger(server_root: Path) -> list[str]:
    path = server_root / ".remoteops" / "ledger.jsonl"
    return [json.loads(line)["action"] for line in path.read_text().splitlines()]


def records(project: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (project / "bundles" / ".deployed").glob("*.json")]


def test_redeploy_and_noop_take_one_agent_command(deploy, project, server_root):
    first = deploy("deploy-bundle", "--yes")
    assert first.commands == 1  # no record yet: the server plans and applies, one request
    [record] = records(project)
    assert record["version"] == 1 and Path(record["manifest"]).is_file()

    (project / "code" / "train.py").write_text("print('train v2')\n")
    (project / "code" / "new.py").write_text("NEW = True\n")
    (project / "code" / "util.py").unlink()
    res = deploy("deploy-bundle", "--yes", "--json")
    assert res.commands == 1, res.stdout
    out = as_json(res)
    assert out["plan"]["added"] == ["code/new.py"] and out["plan"]["changed"] == ["code/train.py"]
    assert out["plan"]["delete"] == ["code/util.py"] and out["plan"]["unchanged"] == 3
    assert out["applied"]["created"] == 1 and out["applied"]["overwritten"] == 1
    assert out["applied"]["deleted"] == 1 and "free_bytes" not in out["applied"]
    manifest_size = len(next((project / "bundles").glob("*-v2.manifest.json")).read_bytes())
    assert out["sent_bytes"] < manifest_size + 2000
    assert tree(server_root) == expected_tree(project)
    assert ledger(server_root) == ["apply", "apply"]
    assert [r["version"] for r in records(project)] == [2]
    # the backup of the fast apply rolls back like any other
    rows = as_json(deploy("backups", "--json"))
    assert rows[-1]["version"] == 2 and rows[-1]["files"] == 3

    # a no-op: one command, which still checks the disk; only the manifest's hash is sent
    res = deploy("deploy-bundle", "--yes", "--json")
    out = as_json(res)
    assert res.commands == 1 and out["noop"] and out["applied"] is None
    assert out["sent_bytes"] < manifest_size // 2
    assert ledger(server_root) == ["apply", "apply"]
    assert not list((server_root / ".remoteops" / "incoming").glob("*"))

    # the human output is the one of the usual path
    (project / "code" / "train.py").write_text("print('train v3')\n")
    res = deploy("deploy-bundle", "--yes")
    assert res.commands == 1
    assert "0 added, 1 changed, 0 deleted, 4 unchanged" in res.stdout
    assert "(server has v2)" in res.stdout and "applied v3: 0 created, 1 overwritten" in res.stdout
    assert "undo with: invoke rollback --backup" in res.stdout
    res = deploy("deploy-bundle", "--yes")
    assert res.commands == 1 and "up to date (v3)" in res.stdout


def test_a_file_edited_on_the_server_is_found_and_restored(deploy, project, server_root):
    deploy("deploy-bundle", "--yes")
    (server_root / "code" / "util.py").write_text("X = 'edited by hand'\n")
    (server_root / "run.sh").chmod(0o644)
    # nothing changed on the laptop: the no-op check finds the edits and repairs them
    res = deploy("deploy-bundle", "--yes")
    assert res.commands == 2  # the refused fast apply; one request plans, streams, applies
    assert "the server is not as last deployed from here (2 file(s) there differ" in res.stdout
    assert "~ code/util.py" in res.stdout and "~ run.sh" in res.stdout
    assert "applied v1: 0 created, 2 overwritten" in res.stdout
    assert tree(server_root) == expected_tree(project)
    assert (server_root / "run.sh").stat().st_mode & 0o777 == 0o755
    # the hand edit is in the backup, so it can be had back
    rows = as_json(deploy("backups", "--json"))
    backup = Path(rows[-1]["path"])
    assert (backup / "files" / "code" / "util.py").read_text() == "X = 'edited by hand'\n"

    # an edit alongside a change from the laptop: same fallback, both end up right
    (server_root / "code" / "util.py").write_text("X = 'edited again'\n")
    (project / "code" / "train.py").write_text("print('v2')\n")
    out = as_json(deploy("deploy-bundle", "--yes", "--json"))
    assert out["plan"]["changed"] == ["code/train.py", "code/util.py"]
    assert tree(server_root) == expected_tree(project)
    assert deploy("deploy-bundle", "--yes").commands == 1  # and the record is good again


def test_a_stale_record_after_a_rollback_elsewhere_falls_back(deploy, project, server_root):
    deploy("deploy-bundle", "--yes")
    v1 = tree(server_root)
    (project / "code" / "train.py").write_text("print('v2')\n")
    deploy("deploy-bundle", "--yes")
    # someone rolls the server back to v1 without this laptop (on the server itself)
    name = as_json(deploy("backups", "--json"))[-1]["name"]
    subprocess.run([sys.executable, "-m", "remoteops.agent", "rollback", "--root",
                    str(server_root), "--backup", name], check=True, capture_output=True)
    assert tree(server_root) == v1
    assert [r["version"] for r in records(project)] == [2]  # stale now

    (project / "code" / "new.py").write_text("NEW = 1\n")
    res = deploy("deploy-bundle", "--yes", "--json")
    assert res.commands == 2  # the refused stream; one request plans, streams, applies
    out = as_json(res)
    assert out["version"] == 3 and out["plan"]["changed"] == ["code/train.py"]
    assert out["plan"]["added"] == ["code/new.py"]
    assert tree(server_root) == expected_tree(project)
    assert ledger(server_root) == ["apply", "apply", "rollback", "apply"]
    assert [r["version"] for r in records(project)] == [3]
    assert not list((server_root / ".remoteops" / "incoming").glob("*"))


def test_rollback_and_dry_run_keep_the_record_honest(deploy, project, server_root):
    deploy("deploy-bundle", "--yes")
    (project / "code" / "train.py").write_text("print('v2')\n")
    deploy("deploy-bundle", "--yes")
    before = tree(server_root)
    (project / "code" / "train.py").write_text("print('v3')\n")
    res = deploy("deploy-bundle", "--dry-run")
    assert res.commands == 1 and "dry run: nothing was changed" in res.stdout
    assert tree(server_root) == before and [r["version"] for r in records(project)] == [2]
    # a rollback from this laptop forgets the record: the next deploy plans on the server
    name = as_json(deploy("backups", "--json"))[-1]["name"]
    deploy("rollback", name, "--yes")
    assert records(project) == []
    res = deploy("deploy-bundle", "--yes")
    assert res.commands == 1 and "the server is not as last deployed" not in res.stdout
    assert tree(server_root) == expected_tree(project)


def test_an_interrupted_apply_makes_the_fast_path_step_aside(deploy, project, server_root):
    deploy("deploy-bundle", "--yes")
    (project / "code" / "train.py").write_text("# v2\n")
    (project / "run.sh").write_text("# v2\n")
    env = {"REMOTEOPS_TEST_KILL_AFTER_FILES": "1"}
    res = subprocess.run([sys.executable, "-m", "remoteops", "deploy-bundle", "--host", "local",
                          "--project-root", str(server_root), "--yes"], cwd=project,
                         env={**os.environ, **ENV, **env}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2
    assert (server_root / ".remoteops" / "journal.json").exists()
    res = deploy("deploy-bundle", "--yes")
    assert "an interrupted change (v2) is to be undone first" in res.stdout
    assert "recovered first: undid an interrupted apply (v2)" in res.stdout
    assert tree(server_root) == expected_tree(project)
    assert ledger(server_root) == ["apply", "recover", "apply"]


def test_most_files_changed_sends_the_bundle_itself_in_one_command(deploy, project,
                                                                    server_root):
    deploy("deploy-bundle", "--yes")
    for path in sorted(p for p in project.rglob("*") if p.is_file()
                       and p.relative_to(project).parts[0] in ("code", "data")):
        # new content unlike the old (a small edit would go as a patch, see tests/deploy_speed)
        path.write_text(os.urandom(4000).hex() + "\n")
    res = deploy("deploy-bundle", "--yes", "--json")
    out = as_json(res)
    assert res.commands == 1 and len(out["plan"]["changed"]) == 3
    bundle = next((project / "bundles").glob("*-v2.tar.zst"))
    assert out["sent_bytes"] > bundle.stat().st_size  # the bundle (and the manifest) went
    assert tree(server_root) == expected_tree(project)


def counted(target, monkeypatch) -> list[str]:
    """The shell commands ``target`` runs from now on."""
    commands: list[str] = []
    real = target.run

    def run(command, **kw):
        commands.append(command)
        return real(command, **kw)

    monkeypatch.setattr(target, "run", run)
    return commands


def test_a_confirmed_deploy_asks_once_and_makes_one_command(deploy, project, server_root,
                                                             monkeypatch, sshd_server):
    """In-process, with a confirm callback (an interactive deploy): the plan from the record."""
    from remoteops.common.config import load_settings
    from remoteops.laptop.deploy import deploy as run_deploy
    from remoteops.laptop.targets import open_target

    deploy("deploy-bundle", "--yes")
    (project / "code" / "train.py").write_text("print('asked')\n")
    monkeypatch.chdir(project)
    monkeypatch.setenv("REMOTEOPS_REMOTE_PYTHON", sys.executable)
    settings = load_settings(flags={"project_root": str(server_root)})
    asked, plans = [], []
    mark = len(sshd_server.log())
    with open_target(settings, "box") as target:
        commands = counted(target, monkeypatch)
        out = run_deploy(settings, target, confirm=lambda plan: asked.append(plan) or True,
                         on_plan=lambda o: plans.append(dict(o.plan)))
    assert len(asked) == 1 and asked[0]["changed"] == ["code/train.py"]
    assert len(plans) == 1 and plans[0]["current_version"] == 1
    # one agent command (deploy-stream, on its own channel), no shell command besides
    assert commands == [] and len(COMMAND.findall(sshd_server.log()[mark:])) == 1
    assert out.applied["overwritten"] == 1 and not out.noop
    assert tree(server_root) == expected_tree(project)
    # declining changes nothing and runs nothing there
    (project / "code" / "train.py").write_text("print('declined')\n")
    before = tree(server_root)
    with open_target(settings, "box") as target:
        commands = counted(target, monkeypatch)
        with pytest.raises(Exception, match="deploy cancelled"):
            run_deploy(settings, target, confirm=lambda plan: False)
    assert commands == [] and tree(server_root) == before
