"""The server-side agent is installed from the bundle's own wheel when it is missing."""

import json
import subprocess
import sys

from tests.conftest import ssh_alias, trust


def test_deploy_installs_the_agent_into_a_bare_server_python(cli, home, project, sshd_server,
                                                             tmp_path):
    venv = tmp_path / "server-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    assert subprocess.run([str(python), "-c", "import remoteops"], cwd=tmp_path,
                          capture_output=True).returncode != 0
    (project / "train.py").write_text("print('hi')\n")
    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)
    root = tmp_path / "server" / "proj"
    env = {"REMOTEOPS_REMOTE_PYTHON": str(python)}
    res = cli("deploy-bundle", "--host", "box", "--project-root", str(root), "--yes", env=env,
              timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "installing remoteops 0.1.0 on box (found: none)" in res.stdout
    assert (root / "train.py").read_text() == "print('hi')\n"
    version = subprocess.run([str(python), "-m", "remoteops.agent", "version", "--json"],
                             capture_output=True, text=True, check=True, cwd=tmp_path)
    assert json.loads(version.stdout)["version"] == "0.1.0"
    # the installed agent is the bundle's wheel, not this checkout
    where = subprocess.run([str(python), "-c", "import remoteops; print(remoteops.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert str(venv) in where
    # next time it is found and not installed again
    (project / "train.py").write_text("print('hi again')\n")
    res = cli("deploy-bundle", "--host", "box", "--project-root", str(root), "--yes", env=env,
              timeout=300)
    assert res.returncode == 0 and "installing" not in res.stdout
    assert (root / "train.py").read_text() == "print('hi again')\n"
