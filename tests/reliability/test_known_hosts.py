"""Marker lines in ~/.ssh/known_hosts, against the real sshd.

Before: paramiko failed to parse ``@cert-authority`` / ``@revoked`` lines and
every SSH command died with an ``InvalidHostKey`` traceback. Now a revoked
host key is refused in one line (also with --trust-host, also when another
line lists it as known) and certificate-authority lines are skipped with one
warning.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ssh_alias, trust

ENV = {"REMOTEOPS_REMOTE_PYTHON": sys.executable}


def other_key(tmp_path: Path) -> str:
    path = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def backups(cli, tmp_path, *extra):
    return cli("backups", "--host", "box", "--project-root", str(tmp_path / "server"), *extra,
               env=ENV, timeout=120)


def test_cert_authority_lines_are_skipped_with_one_warning(cli, home, project, sshd_server,
                                                           tmp_path):
    ssh_alias(home, "box", sshd_server)
    ca = other_key(tmp_path)
    (home / ".ssh" / "known_hosts").write_text(
        f"@cert-authority *.example.com {ca}\n# a comment\n"
        f"@cert-authority *.example.org {ca}\n{sshd_server.known_hosts_line}")
    res = backups(cli, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    warnings = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and \
        "known_hosts:1: @cert-authority" in warnings[0], res.stderr
    assert "no backups" in res.stdout


def test_revoked_key_is_refused_even_when_listed_as_known(cli, home, project, sshd_server,
                                                          tmp_path):
    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)  # the project file lists the key as known ...
    kind, blob = sshd_server.host_pub.split()[:2]
    known = home / ".ssh" / "known_hosts"
    known.write_text(f"# revoked after the leak\n@revoked * {kind} {blob}\n")  # ... but it is revoked
    record = project / ".remoteops" / "known_hosts"
    recorded = record.read_text()
    res = backups(cli, tmp_path)
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "@revoked" in lines[0] and f"{known}:2" in lines[0], res.stderr
    assert "delete that line" in lines[0]
    assert record.read_text() == recorded and not (tmp_path / "server").exists()


def test_revoked_key_is_refused_with_trust_host_and_not_recorded(cli, home, project,
                                                                  sshd_server, tmp_path):
    ssh_alias(home, "box", sshd_server)
    kind, blob = sshd_server.host_pub.split()[:2]
    (home / ".ssh" / "known_hosts").write_text(f"@revoked * {kind} {blob}\n")
    res = backups(cli, tmp_path, "--trust-host")
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 3 and len(lines) == 1 and "@revoked" in lines[0], res.stderr
    assert not (project / ".remoteops").exists() and not (tmp_path / "server").exists()


def test_revoked_key_of_a_host_known_by_another_key_says_revoked(cli, home, project,
                                                                  sshd_server, tmp_path):
    ssh_alias(home, "box", sshd_server)
    kind, blob = sshd_server.host_pub.split()[:2]
    host = sshd_server.known_hosts_line.split()[0]
    (home / ".ssh" / "known_hosts").write_text(f"{host} {other_key(tmp_path)}\n"
                                               f"@revoked * {kind} {blob}\n")
    res = backups(cli, tmp_path)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 3 and len(lines) == 1, res.stderr
    assert "@revoked" in lines[0] and "known_hosts:2" in lines[0]
