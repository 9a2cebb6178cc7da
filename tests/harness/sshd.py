"""A real OpenSSH sshd on a loopback address, with throwaway host and client keys.

Nothing here reads the developer's ~/.ssh: each server has its own folder with
its host key, the client key, and an authorized_keys file every login user
shares (``AuthorizedKeysFile`` is an absolute path, ``StrictModes no``).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness.install import ensure_sshd


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def keygen(path: Path, kind: str = "ed25519") -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "remoteops-test", "-f",
                    str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class SSHServer:
    host: str
    port: int
    folder: Path
    client_key: Path
    host_pub: str
    proc: subprocess.Popen

    @property
    def known_hosts_line(self) -> str:
        kind, blob = self.host_pub.split()[:2]
        return f"[{self.host}]:{self.port} {kind} {blob}\n"

    def spec(self, user: str = "root") -> str:
        return f"{user}@{self.host}:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        path = self.folder / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""


def sftp_subsystem() -> str:
    """Debian's default, the external sftp-server: it runs through the login shell, so a
    noisy ~/.bashrc reaches it, as it does on real servers."""
    for path in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server"):
        if os.access(path, os.X_OK):
            return path
    return "internal-sftp"


def start_sshd(folder: Path, host: str = "127.0.0.1", client_key: Path | None = None,
               host_key_kind: str = "ed25519", log_level: str = "VERBOSE",
               extra_config: str = "") -> SSHServer:
    """Start sshd in ``folder`` on ``host`` at a free port; wait until it speaks SSH."""
    sshd = ensure_sshd()
    folder.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    host_key = folder / "host_key"
    host_pub = keygen(host_key, host_key_kind)
    if client_key is None:
        client_key = folder / "id_ed25519"
        keygen(client_key)
    auth = folder / "authorized_keys"
    auth.write_text(client_key.with_suffix(".pub").read_text())
    os.chmod(auth, 0o644)
    os.chmod(folder, 0o755)
    port = free_port(host)
    config = folder / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress {host}
HostKey {host_key}
PidFile {folder}/sshd.pid
AuthorizedKeysFile {auth}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin yes
Subsystem sftp {sftp_subsystem()}
MaxStartups 100:30:200
MaxSessions 100
LogLevel {log_level}
{extra_config}
""")
    log = open(folder / "sshd.log", "wb")
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    server = SSHServer(host, port, folder, client_key, host_pub, proc)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited at start:\n{server.log()}")
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"sshd did not start on {host}:{port}:\n{server.log()}")


def _locked_edit(argv: list[str]) -> None:
    """useradd/usermod, retried while another test process holds /etc/passwd's lock."""
    for _ in range(25):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def make_user(bashrc: str = "") -> str:
    """A throwaway login user (bash, unlocked for key login) whose ~/.bashrc is ``bashrc``."""
    name = "rotest" + secrets.token_hex(3)
    _locked_edit(["useradd", "-m", "-s", "/bin/bash", name])
    _locked_edit(["usermod", "-p", "*", name])
    home = Path(f"/home/{name}")
    (home / ".bashrc").write_text(bashrc)
    (home / ".bash_profile").write_text(". ~/.bashrc\n")
    subprocess.run(["chown", "-R", f"{name}:{name}", str(home)], check=True)
    return name


def remove_user(name: str) -> None:
    subprocess.run(["pkill", "-KILL", "-u", name], check=False)
    subprocess.run(["userdel", "-r", "-f", name], check=False, capture_output=True)
