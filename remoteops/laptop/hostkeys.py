"""Host-key verification: unknown keys are refused unless trusted, changed keys always.

Fabric's ``Connection`` accepts any unknown key (a hard-coded
``AutoAddPolicy``); every connection we open goes through ``secure_client``
instead. Known keys come from the user's ``~/.ssh/known_hosts`` and the
project's ``.remoteops/known_hosts``; ``--trust-host`` records a new key in
the project file, like OpenSSH's ``StrictHostKeyChecking=accept-new``.

known_hosts files are read here rather than by paramiko, which crashes on
marker lines: ``@revoked`` keys are refused for every host (OpenSSH refuses
them too), also with ``--trust-host`` and also when another line lists the
same key as known; ``@cert-authority`` lines are skipped with one warning
(remoteops does not check host certificates; list the host's own key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import sys
from pathlib import Path

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

from remoteops.common.errors import HostKeyError


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style fingerprint: ``SHA256:<base64 without padding>``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


_warned: set[str] = set()


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        sys.stderr.write(f"warning: {message}\n")
        sys.stderr.flush()


def read_known_hosts(path: Path) -> tuple[list[HostKeyEntry], dict[tuple[str, bytes], str]]:
    """The plain entries of a known_hosts file and its revoked keys (key -> "file:line")."""
    entries: list[HostKeyEntry] = []
    revoked: dict[tuple[str, bytes], str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise HostKeyError(f"cannot read known_hosts file {path}: {exc.strerror}; fix its "
                           "permissions or move it.") from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        marker = None
        if line.startswith("@"):
            marker, line = (line.split(None, 1) + [""])[:2]
            if marker == "@cert-authority":
                _warn_once("cert-authority", f"{path}:{number}: @cert-authority lines are "
                           "skipped (remoteops does not check host certificates); add the "
                           "host's own key to known_hosts to connect to it.")
                continue
            if marker != "@revoked":
                _warn_once(f"marker {marker}", f"{path}:{number}: unknown marker {marker}; line "
                           "skipped.")
                continue
        try:
            entry = HostKeyEntry.from_line(line, number)
        except (InvalidHostKey, paramiko.SSHException, binascii.Error, ValueError):
            entry = None
            _warn_once(f"bad {path}", f"{path}:{number}: not a known_hosts entry; line skipped.")
        if entry is None or entry.key is None:
            continue  # a key type paramiko does not know: it cannot be the server's
        if marker == "@revoked":
            revoked[(entry.key.get_name(), entry.key.asbytes())] = f"{path}:{number}"
        else:
            entries.append(entry)
    return entries, revoked


def load_known_hosts(paths: list[Path]) -> tuple[list[HostKeyEntry], dict]:
    entries, revoked = [], {}
    for path in paths:
        if path.is_file():
            more, gone = read_known_hosts(path)
            entries += more
            revoked.update(gone)
    return [e for e in entries if (e.key.get_name(), e.key.asbytes()) not in revoked], revoked


def revoked_error(hostname: str, key: paramiko.PKey, where: str) -> HostKeyError:
    return HostKeyError(
        f"the host key of {hostname} ({key.get_name()} {fingerprint(key)}) is marked @revoked "
        f"in {where}: refusing to connect. Get the server's new key from its admin, or delete "
        "that line if it was revoked by mistake.")


class VerifyHostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse an unknown or revoked key with its fingerprint, or record it when trusting."""

    def __init__(self, record_file: Path, trust: bool = False,
                 revoked: dict[tuple[str, bytes], str] | None = None):
        self.record_file = Path(record_file)
        self.trust = trust
        self.revoked = revoked or {}

    def missing_host_key(self, client, hostname, key):  # noqa: D401 (paramiko API)
        fp = fingerprint(key)
        where = self.revoked.get((key.get_name(), key.asbytes()))
        if where:
            raise revoked_error(hostname, key, where)
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
    """Load known keys into ``client`` and replace its missing-key policy with ours.

    Revoked keys are left out of the known ones, so paramiko hands them to the policy
    (which refuses them) or reports a changed key (``changed_key_error`` says revoked).
    """
    keys = client.get_host_keys()
    entries, revoked = load_known_hosts(list(known_hosts))
    for entry in entries:
        # HostKeys.load's own bookkeeping: the first line for a host and key type wins
        keys._entries.append(entry)
    client.set_missing_host_key_policy(VerifyHostKeyPolicy(record_file, trust, revoked))


def changed_key_error(exc: paramiko.BadHostKeyException, where: str,
                      files: list[Path]) -> HostKeyError:
    revoked = load_known_hosts([Path(p) for p in files])[1]
    where_revoked = revoked.get((exc.key.get_name(), exc.key.asbytes()))
    if where_revoked:
        return revoked_error(where, exc.key, where_revoked)
    listed = " or ".join(str(p) for p in files if p.is_file()) or "known_hosts"
    return HostKeyError(
        f"host key for {where} has CHANGED (expected {fingerprint(exc.expected_key)}, "
        f"got {fingerprint(exc.key)}): this may be an attack or a reinstalled server; if you know "
        f"it was reinstalled, remove its line from {listed} and connect with --trust-host.")
