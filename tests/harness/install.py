"""Make sure OpenSSH's sshd is installed (the test servers are real sshd processes)."""

import os
import shutil
import subprocess

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def sshd_path() -> str | None:
    for path in SSHD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("sshd")


def ensure_sshd() -> str:
    """Return sshd's path, installing Debian's openssh-server first when root and missing."""
    path = sshd_path()
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("the tests need OpenSSH's sshd: install openssh-server "
                         "(sudo apt-get install openssh-server) and run them again.")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server", "openssh-client",
                    "rsync"], check=True, env=env)
    path = sshd_path()
    if not path:
        raise SystemExit("installing openssh-server did not provide sshd; install it by hand.")
    return path
