"""Make sure the outside tools the tests and benchmarks drive are installed.

The test servers are real OpenSSH ``sshd`` processes and the deploy benchmark compares
with real ``rsync`` and ``scp``: on a fresh Debian machine, as root, the missing ones are
installed with apt-get; anywhere else the caller stops with a one-line message.
"""

import os
import shutil
import subprocess

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
# tool -> the Debian package that provides it
PACKAGES = {"sshd": "openssh-server", "ssh": "openssh-client", "scp": "openssh-client",
            "ssh-keygen": "openssh-client", "rsync": "rsync", "strace": "strace",
            "munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd",
            "sbatch": "slurm-client"}


class MissingTool(SystemExit):
    """A tool is missing and cannot be installed here (a one-line message, no traceback)."""


def tool_path(tool: str) -> str | None:
    if tool == "sshd":
        for path in SSHD_CANDIDATES:
            if os.access(path, os.X_OK):
                return path
    return shutil.which(tool) or (f"/usr/sbin/{tool}" if os.access(f"/usr/sbin/{tool}", os.X_OK)
                                  else None)


def ensure_tools(*tools: str) -> dict[str, str]:
    """Return each tool's path, installing the missing ones first (root on Debian only)."""
    missing = [t for t in tools if not tool_path(t)]
    if missing:
        packages = sorted({PACKAGES[t] for t in missing})
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise MissingTool(f"{', '.join(missing)} not found: install {' '.join(packages)} "
                              f"(sudo apt-get install {' '.join(packages)}) and run again.")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)
        still = [t for t in missing if not tool_path(t)]
        if still:
            raise MissingTool(f"installing {' '.join(packages)} did not provide "
                              f"{', '.join(still)}; install it by hand.")
    return {t: tool_path(t) for t in tools}


# what the test suite drives: real sshd servers, ssh -G as the config oracle, strace to
# watch the apply's fsyncs, rsync for the deploy benchmark's comparison, a private Slurm
# cluster for the slurm executor (tests/harness/slurm.py)
TEST_TOOLS = ("sshd", "ssh", "ssh-keygen", "rsync", "strace", "munged", "slurmctld", "slurmd",
              "sbatch")


def ensure_sshd() -> str:
    """Return sshd's path, after making sure every tool the tests drive is installed."""
    return ensure_tools(*TEST_TOOLS)["sshd"]
