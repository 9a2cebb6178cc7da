"""A connection that goes silent (a NAT forgot it) fails in about two keepalive intervals,
with one line, also after a reconnect and through a ProxyJump hop; not after the command
timeout."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from remoteops.common.config import load_settings
from remoteops.common.errors import ConnectError
from remoteops.laptop.targets import open_target
from tests.conftest import sshd_folder, trust
from tests.harness.proxy import CutProxy
from tests.harness.sshd import start_sshd

ENV = {"REMOTEOPS_SSH__KEEPALIVE": "1", "REMOTEOPS_SSH__CONNECT_RETRIES": "0",
       "REMOTEOPS_SSH__COMMAND_TIMEOUT": "300"}


def _known(project, host: str, port: int, server) -> None:
    path = project / ".remoteops" / "known_hosts"
    path.parent.mkdir(parents=True, exist_ok=True)
    kind, blob = server.host_pub.split()[:2]
    with open(path, "a") as fh:
        fh.write(f"[{host}]:{port} {kind} {blob}\n")


def _silenced_run(target, proxy: CutProxy, after: float = 1.0,
                  call=lambda t: t.run("sleep 60")) -> tuple[float, str]:
    """Black-hole the proxy ``after`` seconds into ``call`` (``sleep 60``); seconds until the
    error."""
    holed = {}

    def hole() -> None:
        time.sleep(after)
        holed["n"] = proxy.blackhole()
        holed["t"] = time.monotonic()

    threading.Thread(target=hole, daemon=True).start()
    with pytest.raises(ConnectError) as err:
        call(target)
    assert holed.get("n"), "the proxy carried no connection to black-hole"
    return time.monotonic() - holed["t"], str(err.value)


def test_silent_drop_is_detected_in_seconds_and_again_after_reconnect(home, project,
                                                                      sshd_server):
    proxy = CutProxy((sshd_server.host, sshd_server.port))
    try:
        _known(project, proxy.host, proxy.port, sshd_server)
        (home / ".ssh" / "config").write_text(
            f"Host box\n  HostName {proxy.host}\n  Port {proxy.port}\n  User root\n"
            f"  IdentityFile {sshd_server.client_key}\n")
        settings = load_settings(project, env=ENV)
        with open_target(settings, "box") as target:
            assert target.run("echo up").stdout.strip() == "up"
            target.write_bytes(str(project / "sftp.txt"), b"before")  # SFTP open too
            seconds, message = _silenced_run(target, proxy)
            assert seconds < 5, f"took {seconds:.1f}s"
            assert "connection lost" in message and "\n" not in message
            # the next call reconnects (a new flow the proxy forwards) with keepalive again
            assert target.run("echo again").stdout.strip() == "again"
            assert target.read_bytes(str(project / "sftp.txt")) == b"before"
            seconds, message = _silenced_run(target, proxy)
            assert seconds < 5 and "connection lost" in message
            # run_python feeds stdin through its own channel: the same holds there
            seconds, message = _silenced_run(
                target, proxy, call=lambda t: t.run_python("import time\ntime.sleep(60)"))
            assert seconds < 5 and "connection lost" in message
    finally:
        proxy.close()


def test_silent_drop_of_a_proxyjump_hop_is_detected(home, project, sshd_server):
    jump = start_sshd(sshd_folder(), host="127.0.0.2", client_key=sshd_server.client_key)
    proxy = CutProxy((jump.host, jump.port))
    try:
        _known(project, proxy.host, proxy.port, jump)
        trust(project, sshd_server)
        (home / ".ssh" / "config").write_text(
            f"Host jumpbox\n  HostName {proxy.host}\n  Port {proxy.port}\n  User root\n"
            f"Host inner\n  HostName {sshd_server.host}\n  Port {sshd_server.port}\n"
            f"  User root\n  ProxyJump jumpbox\n"
            f"Host *\n  IdentityFile {sshd_server.client_key}\n")
        settings = load_settings(project, env=ENV)
        with open_target(settings, "inner") as target:
            assert target.run("echo up").stdout.strip() == "up"
            hops = target.connection.gateway
            assert hops.transport.remoteops_keepalive == 1  # the hop has its own keepalive
            seconds, message = _silenced_run(target, proxy)
            assert seconds < 5 and "connection lost" in message
            assert target.run("echo back").stdout.strip() == "back"
    finally:
        proxy.close()
        jump.stop()
        shutil.rmtree(jump.folder, ignore_errors=True)
