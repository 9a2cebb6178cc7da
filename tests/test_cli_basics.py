"""The commands exist, have help, and `init` scaffolds a project."""

import subprocess
import sys

from tests.conftest import REPO


def test_invoke_list_shows_every_task_with_help():
    out = subprocess.run([sys.executable, "-m", "invoke", "--list"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    for name in ("precheck", "config", "plugins", "install-plugin", "init", "test"):
        line = next((l for l in out.splitlines() if l.strip().startswith(name + " ")), "")
        assert line.split(name, 1)[1].strip(), f"{name} has no help line in:\n{out}"


def test_task_help_describes_flags(cli):
    res = cli("precheck", "--help")
    assert res.returncode == 0
    for flag in ("--host", "--gpu-gate", "--trust-host", "--json", "--project-root"):
        assert flag in res.stdout


def test_agent_help_and_version():
    res = subprocess.run([sys.executable, "-m", "remoteops.agent", "--help"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "version" in res.stdout
    res = subprocess.run([sys.executable, "-m", "remoteops.agent", "version", "--json"],
                         capture_output=True, text=True)
    from remoteops import __version__
    assert f'"version": "{__version__}"' in res.stdout


def test_init_writes_starter_files_and_refuses_to_overwrite(cli, project):
    res = cli("init")
    assert res.returncode == 0, res.stderr
    tasks_py = (project / "tasks.py").read_text()
    assert len(tasks_py.strip().splitlines()) == 2
    assert 'gpu_gate = "strict"' in (project / "remoteops.toml").read_text()
    # the project's own tasks.py gives every task to plain `invoke`
    out = subprocess.run([sys.executable, "-m", "invoke", "--list"], cwd=project,
                         capture_output=True, text=True, check=True).stdout
    assert "precheck" in out and "install-plugin" in out
    (project / "tasks.py").write_text("# mine\n")
    res = cli("init")
    assert res.returncode != 0
    assert "already exist" in res.stderr and "--force" in res.stderr
    assert (project / "tasks.py").read_text() == "# mine\n"


def test_help_after_a_task_with_a_positional_argument_prints_help(cli, project):
    """invoke would take --help as rollback's backup name; it must print help and change nothing."""
    before = sorted(p.name for p in project.iterdir())
    for args in (("rollback", "--help"), ("uninstall-plugin", "--help"), ("install-plugin", "-h")):
        res = cli(*args)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"Usage: remoteops [--core-opts] {args[0]} "), res.stdout
        assert "error" not in res.stderr.lower()
    assert "--dry-run" in cli("rollback", "--help").stdout
    assert sorted(p.name for p in project.iterdir()) == before
