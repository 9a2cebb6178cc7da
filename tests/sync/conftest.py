"""A real sshd whose login shell prints a banner (stdout and stderr) for every session, and a
project that syncs to it."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ssh_alias, sshd_folder, trust
from tests.harness.sshd import start_sshd

BANNER = "Welcome to the GPU box! (banner on stdout)"


@pytest.fixture(scope="module")
def noisy_sshd():
    """sshd for root, whose sessions get a HOME with a noisy ~/.bashrc (root's own untouched)."""
    folder = sshd_folder()
    home = Path(tempfile.mkdtemp(prefix="remoteops-noisy-home-"))
    home.chmod(0o755)
    (home / ".bashrc").write_text(f'echo "{BANNER}"\necho "motd on stderr" >&2\n')
    server = start_sshd(folder, extra_config=f"SetEnv HOME={home}\n")
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def synced(home, project, noisy_sshd, tmp_path):
    """The project knows host ``box`` (the noisy sshd); the server's root is a tmp folder."""
    ssh_alias(home, "box", noisy_sshd)
    trust(project, noisy_sshd)
    root = tmp_path / "server" / "proj"
    env = {"REMOTEOPS_REMOTE_PYTHON": sys.executable, "TRAIN_SYNC_PROJECT_ROOT": str(root)}
    return root, env
