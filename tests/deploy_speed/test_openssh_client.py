"""The deploy's request over the OpenSSH client (``ssh``) and over paramiko, against a real
sshd: the same result, the same host-key policy, the same one-line errors.

This sshd logs at DEBUG1, so its log names the client that connected ("remote software
version OpenSSH_..." or "paramiko_...").
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ssh_alias, sshd_folder, trust
from tests.harness.proxy import CutProxy
from tests.harness.sshd import start_sshd
from tests.test_deploy import as_json, expected_tree, make_project, tree

VERSION = re.compile(r"remote software version (\S+)")
CIPHER = re.compile(r"kex: client->server cipher: (\S+)")
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


@pytest.fixture(scope="module")
def debug_sshd():
    folder = sshd_folder()
    server = start_sshd(folder, log_level="DEBUG1")
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def box(cli, home, project, debug_sshd, tmp_path):
    """``deploy(client, *args)``: deploy-bundle to alias ``box`` with ``ssh.client`` set;
    the result carries the SSH clients sshd saw and the modules the laptop imported."""
    make_project(project)
    ssh_alias(home, "box", debug_sshd)
    trust(project, debug_sshd)
    root = tmp_path / "server"

    def deploy(client: str | None, *args: str, expect: int | None = 0, host: str = "box",
               env: dict | None = None):
        mark = len(debug_sshd.log())
        chosen = {"REMOTEOPS_SSH__CLIENT": client} if client else {}  # None: the default
        res = cli("deploy-bundle", "--host", host, "--project-root", str(root), "--yes", *args,
                  env={**chosen, "PYTHONPROFILEIMPORTTIME": "1",
                       "REMOTEOPS_REMOTE_PYTHON": sys.executable, **(env or {})}, timeout=300)
        assert (res.returncode != 0 if expect is None else res.returncode == expect), \
            res.stdout + res.stderr[-3000:]
        res.clients = VERSION.findall(debug_sshd.log()[mark:])
        res.ciphers = CIPHER.findall(debug_sshd.log()[mark:])
        res.imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines()
                        if line.startswith("import time:")}
        res.said = "\n".join(l for l in res.stderr.splitlines()
                             if not l.startswith("import time:")) + res.stdout
        return res

    deploy.root = root
    return deploy


@pytest.mark.parametrize("client", ["openssh", "paramiko"])
def test_both_clients_deploy_and_redeploy_exactly(box, project, client):
    first = box(client, "--json")
    assert as_json(first)["applied"]["created"] == 5
    (project / "code" / "train.py").write_text("print('train v2')\n")
    res = box(client, "--json")
    out = as_json(res)
    assert out["plan"]["changed"] == ["code/train.py"] and out["applied"]["overwritten"] == 1
    assert tree(box.root) == expected_tree(project)
    noop = box(client, "--json")
    assert as_json(noop)["noop"]
    if client == "openssh":  # one login, by ssh; the laptop never loaded paramiko or fabric
        assert [c.split("_")[0] for c in res.clients] == ["OpenSSH"]
        assert not {"paramiko", "fabric"} & res.imported
    else:
        assert [c.split("_")[0] for c in res.clients] == ["paramiko"]
        assert "paramiko" in res.imported


def test_by_default_the_whole_bundle_goes_by_ssh_and_a_redeploy_by_paramiko(box, project):
    """Left at its default, ``[ssh] client`` sends a deploy that streams the whole bundle
    (no record of the server) through ``ssh``: paramiko's per-packet work in Python made
    such a deploy ~0.5 s longer on loopback. A redeploy, small, logs in with paramiko
    (two round trips fewer). ``client = "paramiko"``, chosen, keeps everything there."""
    first = box(None, "--json")
    assert as_json(first)["applied"]["created"] == 5
    assert [c.split("_")[0] for c in first.clients] == ["OpenSSH"]
    assert not {"paramiko", "fabric"} & first.imported
    (project / "code" / "train.py").write_text("print('train v2')\n")
    again = box(None, "--json")
    assert as_json(again)["plan"]["changed"] == ["code/train.py"]
    assert [c.split("_")[0] for c in again.clients] == ["paramiko"]
    assert tree(box.root) == expected_tree(project)
    shutil.rmtree(project / "bundles")  # no record: the whole bundle again
    shutil.rmtree(box.root)
    chosen = box("paramiko", "--json")
    assert as_json(chosen)["applied"]["created"] == 5
    assert [c.split("_")[0] for c in chosen.clients] == ["paramiko"]
    assert tree(box.root) == expected_tree(project)


def _error_line(res) -> str:
    lines = [l for l in res.said.splitlines() if "host key" in l]
    assert len(lines) == 1 and "Traceback" not in res.said, res.said
    return lines[0]


def test_a_changed_host_key_is_refused_with_the_same_line_by_both(box, project, debug_sshd):
    known = project / ".remoteops" / "known_hosts"
    host = debug_sshd.known_hosts_line.split()[0]
    known.write_text(f"{host} {OTHER_KEY}\n")
    lines, codes = {}, {}
    for client in ("openssh", "paramiko", "auto"):
        res = box(client, expect=None)
        lines[client], codes[client] = _error_line(res), res.returncode
        assert not box.root.exists()
    assert "has CHANGED" in lines["openssh"]
    assert lines["openssh"] == lines["paramiko"] == lines["auto"]
    assert codes["openssh"] == codes["paramiko"] == codes["auto"]


def test_an_unknown_host_key_is_refused_with_the_same_line_by_both(box, project):
    (project / ".remoteops" / "known_hosts").write_text("")
    openssh, paramiko = (box(c, expect=None) for c in ("openssh", "paramiko"))
    assert "unknown host key" in _error_line(openssh) and "--trust-host" in _error_line(openssh)
    assert _error_line(openssh) == _error_line(paramiko)
    assert openssh.returncode == paramiko.returncode


def test_known_hosts_that_ssh_would_read_more_loosely_keep_paramiko(box, project, debug_sshd):
    # ssh would accept a host certificate signed by this CA; our policy does not read them
    with open(project / ".remoteops" / "known_hosts", "a") as fh:
        fh.write(f"@cert-authority * {OTHER_KEY}\n")
    res = box("auto", "--json")
    assert [c.split("_")[0] for c in res.clients] == ["paramiko"]
    assert tree(box.root) == expected_tree(project)
    res = box("openssh", expect=None)
    assert ('ssh.client = "openssh" cannot reach box: ' in res.said
            and "@cert-authority" in res.said and "Traceback" not in res.said)


def test_a_cut_connection_under_ssh_changes_nothing_and_says_so(box, project, home,
                                                                  debug_sshd):
    big = project / "data" / "big.bin"
    big.parent.mkdir(exist_ok=True)
    big.write_bytes(os.urandom(3 << 20))
    proxy = CutProxy((debug_sshd.host, debug_sshd.port))
    try:
        via = dataclasses.replace(debug_sshd, port=proxy.port)
        ssh_alias(home, "cut", via)
        trust(project, via)
        box("openssh", host="cut")
        before = tree(box.root)
        big.write_bytes(os.urandom(3 << 20))
        proxy.arm(1 << 20)  # well after the login, in the middle of the new file
        res = box("openssh", expect=None, host="cut")
        assert proxy.cuts == 1
        assert "connection lost to cut (" in res.said and "run the command again" in res.said
        assert "Traceback" not in res.said
        assert tree(box.root) == before  # nothing applied without the go-ahead
        res = box("openssh", "--json", host="cut")
        assert [c.split("_")[0] for c in res.clients] == ["OpenSSH"]
        assert tree(box.root) == expected_tree(project)
    finally:
        proxy.close()


def test_a_banner_shell_changes_nothing_under_ssh(box, project, tmp_path):
    wrapper = tmp_path / "python.sh"
    wrapper.write_text("#!/bin/bash\necho 'Welcome: banner on stdout'\necho motd >&2\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    env = {"REMOTEOPS_REMOTE_PYTHON": str(wrapper)}
    box("openssh", env=env)
    (project / "code" / "train.py").write_text("print('v3')\n")
    res = box("openssh", "--json", env=env)
    assert as_json(res)["applied"]["overwritten"] == 1
    assert [c.split("_")[0] for c in res.clients] == ["OpenSSH"]
    assert tree(box.root) == expected_tree(project)


def test_openssh_through_a_proxy_jump_is_a_one_line_error(box, home, project, debug_sshd):
    with open(home / ".ssh" / "config", "a") as fh:
        fh.write("Host hopped\n  HostName 127.0.0.1\n  ProxyJump box\n")
    res = box("openssh", expect=None, host="hopped")
    assert ('ssh.client = "openssh" cannot reach hopped: the host is reached through a '
            'ProxyJump or ProxyCommand; set ssh.client to "auto" or "paramiko".') in res.said
    assert "Traceback" not in res.said


def test_a_full_deploy_is_staged_while_it_arrives_and_a_cut_one_resumes(box, project, home,
                                                                          debug_sshd):
    data = project / "data" / "many"
    data.mkdir(parents=True)
    for i in range(40):
        (data / f"s{i:02d}.bin").write_bytes(os.urandom(64 << 10))
    proxy = CutProxy((debug_sshd.host, debug_sshd.port))
    try:
        via = dataclasses.replace(debug_sshd, port=proxy.port)
        ssh_alias(home, "cut", via)
        trust(project, via)
        proxy.arm(1 << 20)  # in the middle of the bundle's 2.6 MB
        res = box("openssh", expect=None, host="cut")
        assert proxy.cuts == 1 and "connection lost to cut (" in res.said
        # the server's agent reads to the end of its input, then drops what it staged: the
        # command may have returned first
        _wait_for_agents(box.root)
        assert not (box.root / "data").exists()  # nothing applied
        staging = box.root / ".remoteops" / "staging"
        assert not staging.exists() or not any(staging.iterdir())
        # what reached the server's disk before the cut is kept and resumed from (under
        # load the cut can come before the agent wrote a byte: then it starts afresh; so it
        # does when it came before the manifest, which names the part: server/stream_first)
        kept = sum(p.stat().st_size for p in
                   (box.root / ".remoteops" / "incoming").glob("stream-*.part"))
        res = box("openssh", "--json", host="cut")
        out = as_json(res)
        assert out["applied"]["created"] == 45
        # a resumed upload is staged after it arrived, a fresh one while it arrives
        assert ("staged_while_arriving" in out["applied"]) == (kept == 0), (kept, out)
        assert tree(box.root) == expected_tree(project)
    finally:
        proxy.close()
    (data / "s00.bin").write_bytes(os.urandom(64 << 10))
    shutil.rmtree(box.root)  # a first deploy again (no record: the server plans), from
    shutil.rmtree(project / "bundles" / ".deployed")  # the first byte
    res = box("paramiko", "--json")
    assert as_json(res)["applied"].get("staged_while_arriving") == 45, res.stdout
    assert tree(box.root) == expected_tree(project)


def _wait_for_agents(root: Path, seconds: float = 60) -> None:
    """Until no agent process works on ``root`` (its command line names it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        working = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            working = working or (b"remoteops.agent" in argv and os.fsencode(root) in argv)
        if not working:
            return
        time.sleep(0.05)
    raise AssertionError(f"an agent still works on {root} {seconds:.0f}s after the cut")


def test_ssh_prefers_aes_gcm_and_takes_what_the_server_offers(box, project, home, tmp_path):
    """AES-GCM first (hardware AES: less CPU per byte than ChaCha20 on both ends); a server
    that offers only ChaCha20 is reached as before."""
    res = box("openssh")
    assert res.clients and all(c.startswith("OpenSSH") for c in res.clients)
    assert res.ciphers and set(res.ciphers) == {"aes128-gcm@openssh.com"}
    folder = sshd_folder()
    only = start_sshd(folder, log_level="DEBUG1",
                      extra_config="Ciphers chacha20-poly1305@openssh.com")
    try:
        ssh_alias(home, "chacha", only)
        trust(project, only)
        mark = len(only.log())
        (project / "code" / "train.py").write_text("print('over chacha20')\n")
        box("openssh", "--json", host="chacha")
        assert set(CIPHER.findall(only.log()[mark:])) == {"chacha20-poly1305@openssh.com"}
        assert VERSION.findall(only.log()[mark:])[0].startswith("OpenSSH")
        assert tree(box.root) == expected_tree(project)
    finally:
        only.stop()
        shutil.rmtree(folder, ignore_errors=True)
