"""Host-key verification: unknown keys are refused unless trusted, changed keys always.

Fabric's ``Connection`` accepts any unknown key (a hard-coded
``AutoAddPolicy``); every connection we open goes through ``secure_client``
instead. Known keys come from the user's ``~/.ssh/known_hosts`` and the
project's ``.remoteops/known_hosts``; ``--trust-host`` records a new key in
the project file, like OpenSSH's ``StrictHostKeyChecking=accept-new``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import paramiko

from remoteops.errors import HostKeyError


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style fingerprint: ``SHA256:<base64 without padding>``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class VerifyHostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse an unknown key with its fingerprint, or record it when trusting."""

    def __init__(self, record_file: Path, trust: bool = False):
        self.record_file = Path(record_file)
        self.trust = trust

    def missing_host_key(self, client, hostname, key):  # noqa: D401 (paramiko API)
        fp = fingerprint(key)
        if not self.trust:
            raise HostKeyError(
                f"unknown host key for {hostname}: {key.get_name()} {fp}. If that is your "
                f"server's fingerprint, run again with --trust-host to record it in "
                f"{self.record_file}.")
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.record_file.parent.mkdir(parents=True, exist_ok=True)
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        with open(self.record_file, "a", encoding="ascii") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def secure_client(client: paramiko.SSHClient, known_hosts: list[Path], record_file: Path,
                  trust: bool) -> None:
    """Load known keys into ``client`` and replace its missing-key policy with ours."""
    keys = client.get_host_keys()
    for path in known_hosts:
        if path.is_file():
            try:
                keys.load(str(path))
            except (OSError, paramiko.SSHException) as exc:
                raise HostKeyError(f"cannot read known_hosts file {path}: {exc}; fix or move "
                                   f"it.") from None
    client.set_missing_host_key_policy(VerifyHostKeyPolicy(record_file, trust))


def changed_key_error(exc: paramiko.BadHostKeyException, where: str,
                      files: list[Path]) -> HostKeyError:
    listed = " or ".join(str(p) for p in files if p.is_file()) or "known_hosts"
    return HostKeyError(
        f"host key for {where} has CHANGED (expected {fingerprint(exc.expected_key)}, "
        f"got {fingerprint(exc.key)}): this may be an attack or a reinstalled server; if you know "
        f"it was reinstalled, remove its line from {listed} and connect with --trust-host.")
