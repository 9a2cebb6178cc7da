"""The OpenSSH client (``ssh``) as the transport of an agent stream (the deploy's request).

Ansible and rsync drive the ``ssh`` binary rather than a Python SSH library: it
starts in milliseconds, handshakes in C and moves bytes without Python's
per-packet work. paramiko (through Fabric) stays the transport of everything
else (SFTP, tunnels, plain commands) and the fallback of this one.

``[ssh] client`` picks: ``paramiko`` (the default) never uses it; ``auto`` uses
``ssh`` when it is on PATH and the host can be expressed for it exactly as paramiko
would connect; ``openssh`` insists (an endpoint it cannot express is a one-line
error). It is not the default because it did not pay where measured (issue 14):
``ssh`` logs in with two more round trips than paramiko (a ``none`` probe and a
public-key query before the signature), which costs a small deploy 0.1-0.2 s on a
100 ms link, and on loopback the CPU it saves was within the noise of a shared
2-core machine. It is for links where paramiko's per-packet work limits a large
upload.

The host-key policy is the project's, never weaker: ``-F /dev/null`` (the host was
already resolved by ``ssh_config``), ``StrictHostKeyChecking=yes`` against exactly
the two known_hosts files paramiko reads (no global file, no CheckHostIP, no
UpdateHostKeys), ``BatchMode=yes``. Whatever OpenSSH would read differently from
``hostkeys`` is not expressed: ``@cert-authority`` lines, wildcard or negated host
patterns, a ProxyJump or ProxyCommand, ``--trust-host`` (which records a new key),
a key passphrase. A connection ``ssh`` cannot make (an unknown or changed key,
a refused key, a refused port) falls back to paramiko before anything is sent, so
the error the user reads is the same one-line error as always, and a server only
paramiko can reach still works.

It prefers AES-GCM over OpenSSH's default ChaCha20-Poly1305 (``CIPHERS``: the same
ciphers, another order; a server without AES-GCM agrees on the next): with the AES
instructions every x86 and ARMv8 CPU of the last decade has, it costs about a third
less CPU per byte on both ends (200 MB over loopback: client 0.20 against 0.30 CPU-s),
which a full deploy's 100 MB and more feel on a busy machine.

``ssh`` tells us it is connected through ``LocalCommand`` (run after the login,
before the session opens): a marker on its stderr. Until then nothing is sent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from remoteops.common.errors import ConfigError

CLIENTS = ("auto", "openssh", "paramiko")
CONNECTED = b"@@REMOTEOPS-SSH-CONNECTED@@"
# paramiko's look_for_keys: these files under $HOME/.ssh, in this order
_DEFAULT_KEYS = ("id_rsa", "id_dsa", "id_ecdsa", "id_ed25519")
_UNSAFE = ('"', "%", "\n", "\r")  # would be read as quoting or %-tokens by ssh


@dataclass
class Endpoint:
    """Where and how paramiko connects to one host (from ``ssh.connection_factory``)."""

    label: str
    hostname: str
    port: int
    user: str
    identity_files: list[str] = field(default_factory=list)  # in paramiko's order
    look_for_keys: bool = True
    known_hosts: list[Path] = field(default_factory=list)
    via_proxy: bool = False        # a ProxyJump hop or a ProxyCommand
    trust_host: bool = False
    passphrase: bool = False
    connect_timeout: float = 10.0
    keepalive: float = 15.0


@dataclass(frozen=True)
class OpenSSHClient:
    """``ssh`` with every option fixed; ``start(command)`` runs one remote command."""

    argv: tuple[str, ...]   # everything up to (not including) the remote command
    where: str              # user@host:port, for messages
    connect_timeout: float = 10.0

    def start(self, command: str) -> subprocess.Popen:
        # LocalCommand runs through $SHELL: make it one that reads ``echo ... >&2``
        env = {**os.environ, "SHELL": "/bin/sh"}
        return subprocess.Popen([*self.argv, command], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                                env=env, start_new_session=True)  # Ctrl-C reaches us, not ssh


def why_not(endpoint: Endpoint, ssh_binary: str | None) -> str | None:
    """Why ``ssh`` cannot connect exactly as paramiko would (None: it can)."""
    if ssh_binary is None:
        return "no ssh client on PATH"
    if endpoint.via_proxy:
        return "the host is reached through a ProxyJump or ProxyCommand"
    if endpoint.trust_host:
        return "--trust-host records a new host key (paramiko does that)"
    if endpoint.passphrase:
        return "the key has a passphrase in the settings"
    texts = [endpoint.hostname, endpoint.user, *endpoint.identity_files,
             *(str(p) for p in endpoint.known_hosts)]
    if any(ch in text for text in texts for ch in _UNSAFE) or \
            endpoint.hostname.startswith("-") or endpoint.user.startswith("-"):
        return "a host, user or file name ssh would read differently"
    for path in endpoint.known_hosts:
        reason = _reads_differently(path)
        if reason:
            return reason
    return None


def _reads_differently(path: Path) -> str | None:
    """A known_hosts line that OpenSSH would honour and ``hostkeys`` would not."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError:
        return f"{path} cannot be read"  # paramiko says so, in its own words
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            marker, _, line = line.partition(" ")
            if marker != "@revoked":
                return f"{path} has {marker} lines"
            continue  # both refuse a revoked key
        hosts = line.split(None, 1)[0]
        if any(ch in hosts for ch in "*?!"):
            return f"{path} has host patterns"
    return None


def client_for(endpoint: Endpoint, choice: str) -> OpenSSHClient | None:
    """The OpenSSH client for ``endpoint`` under ``[ssh] client = choice``, or None for
    paramiko; ``openssh`` that cannot be honoured is a one-line error."""
    if choice not in CLIENTS:
        raise ConfigError(f"ssh.client is '{choice}'; set it to one of {', '.join(CLIENTS)}.")
    if choice == "paramiko":
        return None
    binary = shutil.which("ssh")
    reason = why_not(endpoint, binary)
    if reason is not None:
        if choice == "openssh":
            raise ConfigError(f"ssh.client = \"openssh\" cannot reach {endpoint.label}: {reason}; "
                              "set ssh.client to \"auto\" or \"paramiko\".")
        return None
    return OpenSSHClient(tuple(argv_for(endpoint, binary)),
                         f"{endpoint.user}@{endpoint.hostname}:{endpoint.port}",
                         endpoint.connect_timeout)


CIPHERS = ("aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
           "aes128-ctr,aes192-ctr,aes256-ctr")


def argv_for(endpoint: Endpoint, binary: str = "ssh") -> list[str]:
    """``ssh`` with the project's policy spelled out (see the module)."""
    keys = [f for f in endpoint.identity_files if os.path.isfile(f)]
    if endpoint.look_for_keys:
        home = Path(os.path.expanduser("~/.ssh"))  # $HOME, as paramiko; ssh would use passwd
        keys += [str(home / n) for n in _DEFAULT_KEYS if (home / n).is_file()]
    keys = list(dict.fromkeys(keys))
    known = " ".join(f'"{p}"' for p in endpoint.known_hosts) or "/dev/null"
    options = {
        "BatchMode": "yes", "StrictHostKeyChecking": "yes", "UserKnownHostsFile": known,
        "GlobalKnownHostsFile": "/dev/null", "CheckHostIP": "no", "UpdateHostKeys": "no",
        "VerifyHostKeyDNS": "no", "CanonicalizeHostname": "no",
        # paramiko: the files, then the agent's keys; never passwd-home's defaults
        "IdentitiesOnly": "no", "IdentityFile": "none",
        "PasswordAuthentication": "no", "KbdInteractiveAuthentication": "no",
        "ControlMaster": "no", "ControlPath": "none", "ForwardAgent": "no", "ForwardX11": "no",
        "ClearAllForwardings": "yes", "ProxyCommand": "none", "ProxyJump": "none",
        "Compression": "no", "ConnectionAttempts": "1", "LogLevel": "ERROR",
        "Ciphers": CIPHERS,
        "ConnectTimeout": str(max(1, int(round(endpoint.connect_timeout)))),
        "PermitLocalCommand": "yes", "LocalCommand": f"echo {CONNECTED.decode()} >&2",
    }
    if endpoint.keepalive:  # as ssh.keep_alive: closed after two unanswered intervals
        options.update(ServerAliveInterval=str(max(1, int(endpoint.keepalive))),
                       ServerAliveCountMax="2")
    argv = [binary, "-F", "/dev/null", "-T", "-e", "none"]
    for name, value in options.items():
        argv += ["-o", f"{name}={value}"]
    for key in keys:
        argv += ["-i", key]
    return argv + ["-l", endpoint.user, "-p", str(endpoint.port), "--", endpoint.hostname]


__all__ = ["CLIENTS", "CONNECTED", "Endpoint", "OpenSSHClient", "argv_for", "client_for",
           "why_not"]
