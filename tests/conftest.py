"""Shared fixtures: a real sshd, an isolated HOME, a project folder, the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness.sshd import SSHServer, keygen, make_user, remove_user, start_sshd

REPO = Path(__file__).resolve().parent.parent


# The suite's servers live for a test or a session; a kept connection (laptop/keeper) would
# outlive them and carry one test's connection into the next. Off unless a test turns it on
# (tests/kept).
NO_KEEPER = {"REMOTEOPS_SSH__PERSIST": "0"}


def pytest_configure(config):
    sys._called_from_test = True  # no entry-point autoload in-process (llm's convention)
    os.environ.update(NO_KEEPER)


def sshd_folder() -> Path:
    """A folder sshd can read as any login user (pytest's tmp folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="remoteops-sshd-"))
    folder.chmod(0o755)
    return folder


@pytest.fixture(scope="session")
def sshd_server() -> SSHServer:
    folder = sshd_folder()
    server = start_sshd(folder)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def servers():
    """Three sshd on 127.0.0.1, 127.0.0.2 and 127.0.0.3 sharing one client key
    (``servers[i].client_key``): the hosts h1, h2, h3 of tests/hosts and tests/multinode."""
    folder = sshd_folder()
    key = folder / "client_key"
    keygen(key)
    started = []
    try:
        for i, address in enumerate(("127.0.0.1", "127.0.0.2", "127.0.0.3")):
            started.append(start_sshd(folder / f"h{i + 1}", host=address, client_key=key))
        yield started
    finally:
        for server in started:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny demo model (seed 0), built once for every test that trains or loads it; tests
    read it, never write it."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from remoteops.trainer.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("tiny-model") / "demo-model", seed=0)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A throwaway HOME: tests never read the developer's ~/.ssh or config files."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for name in list(os.environ):
        if name.startswith(("REMOTEOPS_", "TRAIN_SYNC_", "SSH_AUTH_SOCK", "XDG_CONFIG_HOME",
                            "XDG_CACHE_HOME")):
            monkeypatch.delenv(name)
    for name, value in NO_KEEPER.items():
        monkeypatch.setenv(name, value)
    return home


@pytest.fixture
def project(tmp_path, home) -> Path:
    folder = tmp_path / "proj"
    folder.mkdir()
    return folder


def trust(project: Path, server: SSHServer) -> None:
    """Record the server's host key in the project's known_hosts, as --trust-host would."""
    path = project / ".remoteops" / "known_hosts"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(server.known_hosts_line)


def ssh_alias(home: Path, alias: str, server: SSHServer, user: str = "root") -> None:
    with open(home / ".ssh" / "config", "a") as fh:
        fh.write(f"Host {alias}\n  HostName {server.host}\n  Port {server.port}\n"
                 f"  User {user}\n  IdentityFile {server.client_key}\n")


@pytest.fixture
def cli(project):
    """Run the ``remoteops`` command (the same tasks as ``invoke``) in ``project``."""

    def run(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        full_env = dict(os.environ, COLUMNS="200", **(env or {}))
        return subprocess.run([sys.executable, "-m", "remoteops", *args], cwd=cwd or project,
                              env=full_env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def login_user():
    """A factory of throwaway users with a given ~/.bashrc, removed afterwards."""
    made: list[str] = []

    def make(bashrc: str = "") -> str:
        made.append(make_user(bashrc))
        return made[-1]

    yield make
    for name in made:
        remove_user(name)
