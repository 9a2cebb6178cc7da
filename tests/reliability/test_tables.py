"""Names a user types back (a backup for rollback, a run id) print whole, even in a pipe at
40 columns, where rich used to cut them with an ellipsis or fold them over two lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def narrow(project, *args: str) -> subprocess.CompletedProcess:
    """The command through a pipe at 40 columns (the cli fixture pins COLUMNS=200)."""
    return subprocess.run([sys.executable, "-m", "remoteops", *args], cwd=project,
                          env=dict(os.environ, COLUMNS="40"), capture_output=True, text=True,
                          timeout=120)


def whole_on_one_line(name: str, text: str) -> bool:
    return any(name in line for line in text.splitlines())


def test_backups_table_prints_full_names_in_a_narrow_pipe(cli, project, tmp_path):
    (project / "code").mkdir()
    (project / "code" / "train.py").write_text("print('v1')\n")
    root = tmp_path / "server-root"
    for version in (1, 2):
        (project / "code" / "train.py").write_text(f"print('v{version}')\n")
        res = cli("deploy-bundle", "--host", "local", "--project-root", str(root), "--yes")
        assert res.returncode == 0, res.stdout + res.stderr
    res = cli("backups", "--host", "local", "--project-root", str(root), "--json")
    names = [r["name"] for r in json.loads(res.stdout)]
    assert names
    res = narrow(project, "backups", "--host", "local", "--project-root", str(root))
    assert res.returncode == 0, res.stderr
    for name in names:
        assert whole_on_one_line(name, res.stdout), (name, res.stdout)
    assert "…" not in res.stdout
    # the marked one is the one to type, and it still works when copied from the table
    current = next(l for l in res.stdout.splitlines() if "*" in l and any(n in l for n in names))
    name = next(n for n in names if n in current)
    res = cli("rollback", "--host", "local", "--project-root", str(root), name, "--yes")
    assert res.returncode == 0 and "rolled back" in res.stdout, res.stdout + res.stderr


def test_runs_table_prints_full_run_ids_in_a_narrow_pipe(cli, project):
    (project / "remoteops.toml").write_text('[stages.hello]\ncommand = "echo hello"\n')
    for _ in range(2):
        res = cli("remote-train", "--host", "local", "--yes", "--stages", "hello", timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
    res = cli("runs", "--host", "local", "--json")
    run_ids = [r["run_id"] for r in json.loads(res.stdout)]
    assert len(run_ids) == 2
    res = narrow(project, "runs", "--host", "local")
    assert res.returncode == 0, res.stderr
    for run_id in run_ids:
        assert whole_on_one_line(run_id, res.stdout), (run_id, res.stdout)
    assert "…" not in res.stdout
    res = narrow(project, "status", "--host", "local", "--run", run_ids[0])
    assert whole_on_one_line("hello", res.stdout)
