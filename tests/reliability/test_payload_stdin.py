"""Settings and other payloads reach the server's Python on stdin, never on a command line
that every user of a shared server can read in ``ps``."""

from __future__ import annotations

import base64
import re
import sys
import threading
import uuid
import zlib
from pathlib import Path

import pytest

from remoteops.common.config import load_settings
from remoteops.common.errors import RemoteCommandError
from remoteops.common.target import LocalTarget
from remoteops.laptop.targets import open_target
from tests.conftest import trust

# The server's Python must outlive a few samples of the process table.
SCRIPT = "import time\ntime.sleep(1.0)\nresult = payload['secret'][::-1]"
_B64 = re.compile(rb"[A-Za-z0-9+/=]{24,}")


def _visible(cmdline: bytes) -> bytes:
    """A command line as ``ps`` shows it, plus whatever base64+zlib blobs in it decode to."""
    seen = [cmdline]
    for blob in _B64.findall(cmdline):
        try:
            seen.append(zlib.decompress(base64.b64decode(blob + b"=" * (-len(blob) % 4))))
        except (ValueError, zlib.error):
            pass
    return b"\n".join(seen)


class CmdlineSampler:
    """Reads every process's command line from /proc until stopped."""

    def __init__(self):
        self.lines: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    self.lines.add(path.read_bytes().replace(b"\0", b" "))
                except OSError:
                    pass
            self._stop.wait(0.01)

    def __enter__(self) -> "CmdlineSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _call_and_watch(target) -> None:
    secret = "s3cret-" + uuid.uuid4().hex
    with CmdlineSampler() as sampler:
        answer = target.run_python(SCRIPT, {"secret": secret, "db_password": secret})
    assert answer == secret[::-1]
    ran = [line for line in sampler.lines if b"REMOTEOPS-BEGIN" in line]
    assert ran, "the sampler never saw the target's Python"
    leaked = [line[:200] for line in sampler.lines if secret.encode() in _visible(line)]
    assert not leaked, f"the payload is visible in ps: {leaked}"


def test_payload_is_not_on_any_command_line_over_ssh(home, project, sshd_server):
    trust(project, sshd_server)
    (home / ".ssh" / "config").write_text(f"Host *\n  IdentityFile {sshd_server.client_key}\n")
    settings = load_settings(project, env={"REMOTEOPS_REMOTE_PYTHON": sys.executable})
    with open_target(settings, sshd_server.spec()) as target:
        _call_and_watch(target)


def test_payload_is_not_on_any_command_line_locally(tmp_path):
    _call_and_watch(LocalTarget("local", str(tmp_path), sys.executable))


def test_payload_survives_a_noisy_login_shell_and_a_bashrc_that_eats_stdin_is_named(
        home, project, sshd_server, login_user):
    trust(project, sshd_server)
    (home / ".ssh" / "config").write_text(f"Host *\n  IdentityFile {sshd_server.client_key}\n")
    settings = load_settings(project, env={"REMOTEOPS_REMOTE_PYTHON": "/usr/bin/python3"})
    noisy = login_user('echo "Welcome! banner on stdout"\necho "motd" >&2\n')
    with open_target(settings, sshd_server.spec(noisy)) as target:
        big = "x" * 300_000  # more than one SSH window's worth once encoded
        assert target.run_python("result = len(payload)", big) == len(big)
    greedy = login_user("read -r first_line\n")
    with open_target(settings, sshd_server.spec(greedy)) as target:
        with pytest.raises(RemoteCommandError) as err:
            target.run_python("result = 1")
    assert "did not arrive on stdin" in str(err.value) and "bashrc" in str(err.value)
