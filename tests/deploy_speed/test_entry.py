"""``remoteops deploy-bundle --host H --yes`` starts without invoke (laptop/entry), with the
same output, error line and exit code as the full program; any other form goes to it."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ssh_alias, trust
from tests.test_deploy import ENV, as_json, expected_tree, make_project, tree

FULL = "from remoteops.laptop.main import program; program.run()"  # the invoke program itself


def _run(project, args, full=False, env=None):
    import os

    cmd = [sys.executable, "-c", FULL, *args] if full else \
        [sys.executable, "-m", "remoteops", *args]
    res = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "200", "PYTHONPROFILEIMPORTTIME": "1",
                              **ENV, **(env or {})})
    res.imported = {l.rsplit("|", 1)[-1].strip() for l in res.stderr.splitlines()
                    if l.startswith("import time:")}
    res.err = "\n".join(l for l in res.stderr.splitlines() if not l.startswith("import time:"))
    return res


def test_the_quick_form_deploys_without_invoke_and_answers_as_the_program(
        home, project, sshd_server, tmp_path):
    make_project(project)
    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)
    root = str(tmp_path / "server")
    quick = _run(project, ["deploy-bundle", "--host", "box", "--project-root", root, "--yes",
                           "--json"])
    assert quick.returncode == 0, quick.err
    assert as_json(quick)["applied"]["created"] == 5, quick.stdout
    assert tree(tmp_path / "server") == expected_tree(project)
    (project / "code" / "train.py").write_text("print('v2')\n")
    # fabric (paramiko's face) is built on invoke: the ssh client shows the start without it
    text = _run(project, ["deploy-bundle", f"--project-root={root}", "--host=box", "--yes"],
                env={"REMOTEOPS_SSH__CLIENT": "openssh"})
    assert text.returncode == 0, text.err
    assert not {m for m in text.imported if m.split(".")[0] in ("invoke", "fabric", "paramiko")}
    assert "applied v2: 0 created, 1 overwritten, 0 deleted" in text.stdout
    # a no-op both ways: the same lines but the seconds it took
    args = ["deploy-bundle", "--host", "box", "--project-root", root, "--yes"]
    quick, full = _run(project, args), _run(project, args, full=True)
    assert quick.returncode == full.returncode == 0
    assert "remoteops.laptop.tasks" not in quick.imported
    assert "remoteops.laptop.tasks" in full.imported

    def lines(res):
        return [re.sub(r" in [0-9.]+s$", "", l) for l in res.stdout.splitlines()]

    assert lines(quick) == lines(full) and "up to date (v2)" in quick.stdout


def test_errors_are_the_same_line_and_exit_code(project):
    make_project(project)
    args = ["deploy-bundle", "--host", "nosuch.invalid", "--yes"]
    quick, full = _run(project, args), _run(project, args, full=True)
    assert "remoteops.laptop.tasks" not in quick.imported
    assert "remoteops.laptop.tasks" in full.imported
    assert (quick.returncode, quick.err.strip()) == (full.returncode, full.err.strip())
    assert quick.returncode == 3 and quick.err.strip().startswith(
        "error: cannot resolve host name 'nosuch.invalid'")


def test_other_forms_go_to_the_full_program():
    from remoteops.laptop.entry import wire_args

    assert wire_args(["deploy-bundle", "--host", "gpu", "--yes"]) == {
        "yes": True, "json": False, "host": "gpu", "project_root": None}
    for argv in (["deploy-bundle", "--host", "gpu"],            # it would ask first
                 ["deploy-bundle", "--yes"],                     # default_host may be a group
                 ["deploy-bundle", "--host", "a,b", "--yes"],
                 ["deploy-bundle", "--host", "@pair", "--yes"],
                 ["deploy-bundle", "--host", "gpu", "--yes", "--dry-run"],
                 ["deploy-bundle", "--host", "gpu", "--yes", "--help"],
                 ["deploy-bundle", "--host", "--yes"],
                 ["status", "--host", "gpu"], []):
        assert wire_args(argv) is None, argv
