"""A project that names the session's three real sshd (``servers``, tests/conftest.py: 127.0.0.1,
127.0.0.2 and 127.0.0.3) as [hosts] h1, h2, h3, each with its own project root on this
machine, and [groups]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import trust
from tests.harness.sshd import keygen

ENV = {"REMOTEOPS_REMOTE_PYTHON": sys.executable, "REMOTEOPS_GPU_GATE": "warn"}

BASE = """
[precheck]
min_disk_gb = 0.001
min_ram_gb = 0.1
required_packages = ["click"]
optional_packages = []

[ssh]
connect_retries = 0
"""


@pytest.fixture
def roots(tmp_path) -> dict[str, Path]:
    """Each host's project root (all on this machine, so they must differ)."""
    return {f"h{i}": tmp_path / f"server-h{i}" / "proj" for i in (1, 2, 3)}


@pytest.fixture
def wrong_key(tmp_path) -> Path:
    """A key no server accepts."""
    key = tmp_path / "wrong_key"
    keygen(key)
    return key


def hosts_toml(servers, roots: dict[str, Path], keys: dict[str, Path] | None = None,
               extra: dict[str, str] | None = None) -> str:
    """[hosts.hN] tables for the servers, with ``keys``/``extra`` (TOML lines) per host."""
    out = []
    for i, server in enumerate(servers):
        name = f"h{i + 1}"
        key = (keys or {}).get(name, server.client_key)
        out.append(f'\n[hosts.{name}]\nhost = "{server.host}"\nport = {server.port}\n'
                   f'user = "root"\nidentity_file = "{key}"\nproject_root = "{roots[name]}"\n'
                   + (extra or {}).get(name, ""))
    return "".join(out)


def write_project(project: Path, servers, roots, tail: str = "", **kw) -> None:
    (project / "remoteops.toml").write_text(BASE + tail + hosts_toml(servers, roots, **kw))
    for server in servers:
        trust(project, server)


def keyed(stdout: str) -> dict:
    return json.loads(stdout)
