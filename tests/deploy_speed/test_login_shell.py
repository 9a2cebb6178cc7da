"""The streamed deploy through a noisy or greedy login: a banner changes nothing; a shell
that reads stdin before the agent does makes the deploy go by SFTP, correctly, and says why.

The server's Python is a wrapper script that does what a ``.bashrc`` would do before the
agent starts (root's own ``.bashrc`` is not ours to change), over the real sshd.
"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ssh_alias, trust
from tests.deploy_speed.test_one_request import COMMAND, SFTP
from tests.test_deploy import as_json, expected_tree, make_project, tree

BANNER = 'echo "Welcome to the GPU box: banner on stdout"\necho "motd" >&2\n'
# reads a line of stdin before the agent does, for the streamed request only: a command run
# without input (deploy-plan) would wait for it forever, with or without streaming
GREEDY = 'case "$*" in *deploy-stream*) read -r first_line;; esac\n'


@pytest.fixture
def deploy_via(cli, home, project, sshd_server, tmp_path):
    make_project(project)
    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)
    root = tmp_path / "server"

    def run(shell: str, *args):
        wrapper = tmp_path / "python.sh"
        wrapper.write_text(f"#!/bin/bash\n{shell}exec {sys.executable} \"$@\"\n")
        wrapper.chmod(0o755)
        mark = len(sshd_server.log())
        res = cli("deploy-bundle", "--host", "box", "--project-root", str(root), "--yes", *args,
                  env={"REMOTEOPS_REMOTE_PYTHON": str(wrapper)}, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        log = sshd_server.log()[mark:]
        res.commands, res.sftp = len(COMMAND.findall(log)), len(SFTP.findall(log))
        return res

    run.root = root
    return run


def test_a_banner_on_stdout_changes_nothing(deploy_via, project):
    first = deploy_via(BANNER, "--json")
    assert as_json(first)["applied"]["created"] == 5
    (project / "code" / "train.py").write_text("print('v2')\n")
    res = deploy_via(BANNER, "--json")
    assert (res.commands, res.sftp) == (1, 0)
    assert as_json(res)["applied"]["overwritten"] == 1
    assert tree(deploy_via.root) == expected_tree(project)


def test_a_login_shell_that_reads_stdin_gets_the_deploy_by_sftp(deploy_via, project):
    res = deploy_via(GREEDY)
    assert "login shell reads stdin" in res.stdout and "[[ $- == *i* ]]" in res.stdout
    assert tree(deploy_via.root) == expected_tree(project)
    (project / "code" / "train.py").write_text("print('v2')\n")
    res = deploy_via(GREEDY, "--json")
    out = as_json(res)
    assert out["applied"]["overwritten"] == 1 and res.sftp >= 1
    assert tree(deploy_via.root) == expected_tree(project)
    assert not list((deploy_via.root / ".remoteops" / "incoming").glob("*"))


def test_a_login_shell_that_reads_stdin_on_every_command_gets_eof_not_a_hang(deploy_via, cli,
                                                                             project, tmp_path):
    """Every agent command's input is closed after its payload (or at once when it has none),
    so a shell that reads a line of stdin first gets EOF; before, a command without input
    (deploy-plan, backups) waited out ssh.command_timeout (300 s) here."""
    greedy_always = "read -r first_line\n"
    res = deploy_via(greedy_always)  # the streamed request loses its mark: SFTP, and says why
    assert "login shell reads stdin" in res.stdout
    assert tree(deploy_via.root) == expected_tree(project)
    wrapper = tmp_path / "python.sh"  # deploy_via left the greedy wrapper there
    listed = cli("backups", "--host", "box", "--project-root", str(deploy_via.root), "--json",
                 env={"REMOTEOPS_REMOTE_PYTHON": str(wrapper)}, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert [row["version"] for row in as_json(listed)] == [1]
