"""Host resolution equals OpenSSH's: a table of ~/.ssh/config files, each resolved by us and
by ``ssh -G`` (the oracle), then a real connection through a two-hop ProxyJump chain.

The oracle runs as a throwaway user whose passwd home holds the config, because ``ssh``
resolves ``~``, ``%d`` and relative ``Include`` against the passwd home, never ``$HOME``: so
nothing here reads the developer's ~/.ssh.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from remoteops.common.errors import ConfigError
from remoteops.laptop.ssh_config import LocalUser, parse_jump_hop, resolve
from tests.harness.sshd import make_user, remove_user

DEFAULT_KEYS = ["~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ecdsa_sk", "~/.ssh/id_ed25519",
                "~/.ssh/id_ed25519_sk", "~/.ssh/id_xmss", "~/.ssh/id_dsa"]

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")


@pytest.fixture(scope="module")
def oracle():
    """A user whose home holds the configs, and a function running ``ssh -G`` as that user."""
    name = make_user("")
    home = Path(pwd.getpwnam(name).pw_dir)
    ssh_dir = home / ".ssh"

    class Oracle:
        local = LocalUser(name, pwd.getpwnam(name).pw_uid, str(home))
        config = ssh_dir / "config"

        @staticmethod
        def write(files: dict[str, str]) -> None:
            shutil.rmtree(ssh_dir, ignore_errors=True)
            for rel, text in files.items():
                path = ssh_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                path.chmod(0o644)  # root-owned and not writable by others: ssh accepts it
            for folder in [ssh_dir, *[p for p in ssh_dir.rglob("*") if p.is_dir()]]:
                folder.chmod(0o755)

        @classmethod
        def g(cls, host: str, user: str | None = None, port: int | None = None,
              jump: str | None = None) -> dict[str, list[str]]:
            cmd = ["runuser", "-u", name, "--", "ssh", "-G", "-F", str(cls.config)]
            cmd += ["-l", user] if user else []
            cmd += ["-p", str(port)] if port else []
            cmd += ["-J", jump] if jump else []
            out = subprocess.run(cmd + [host], capture_output=True, text=True,
                                 stdin=subprocess.DEVNULL, env=dict(os.environ,
                                                                    ROTEST_VAR="envval"))
            assert out.returncode == 0, out.stderr
            values: dict[str, list[str]] = {}
            for line in out.stdout.splitlines():
                key, _, value = line.partition(" ")
                values.setdefault(key, []).append(value)
            return values

        @classmethod
        def ours(cls, host: str, user: str | None = None, port: int | None = None,
                 jump: str | None = None):
            return resolve(host, config_files=[(str(cls.config), True)], user=user, port=port,
                           jump=jump, local=cls.local)

    yield Oracle
    remove_user(name)


def assert_same(oracle, host: str, user=None, port=None, jump=None):
    """Ours equals ``ssh -G`` for this host and, hop by hop, for its ProxyJump chain."""
    ours = oracle.ours(host, user, port, jump)
    theirs = oracle.g(host, user, port, jump)
    got = {"hostname": ours.hostname, "port": str(ours.port), "user": ours.user,
           "identityfile": ours.identity_raw or DEFAULT_KEYS,
           "proxyjump": None if ours.proxy_jump in (None, "none") else ours.proxy_jump,
           "proxycommand": ours.proxy_command}
    want = {"hostname": theirs["hostname"][0], "port": theirs["port"][0],
            "user": theirs["user"][0], "identityfile": theirs.get("identityfile", []),
            "proxyjump": theirs.get("proxyjump", [None])[0],
            "proxycommand": theirs.get("proxycommand", [None])[0]}
    if want["proxycommand"] is not None:  # ssh -G shows it before %-expansion
        want["proxycommand"] = (want["proxycommand"].replace("%h", ours.hostname)
                                .replace("%p", str(ours.port)))
    assert got == want, f"{host}: ours {got} != ssh -G {want}"
    if ours.via is not None:  # the proxy is ``ssh [-l u] [-p p] [-J rest] last``
        hops = ours.proxy_jump.split(",")
        hop_user, hop_host, hop_port = parse_jump_hop(hops[-1])
        assert ours.via.alias == hop_host
        assert_same(oracle, hop_host, hop_user, hop_port, ",".join(hops[:-1]) or None)
    return ours


TABLE = {
    "plain": ({"config": "Host box\n  HostName 10.0.0.5\n  Port 2222\n  User alice\n"
                         "  IdentityFile ~/.ssh/k1\n"}, ["box", "other"]),
    "first value wins, identity files add up": (
        {"config": "Host box\n  Port 1\n  IdentityFile ~/.ssh/a\nHost *\n  Port 2\n  User bob\n"
                   "  IdentityFile ~/.ssh/b\n  IdentityFile ~/.ssh/a\nHost box\n  User carol\n"
                   "  HostName second\n"}, ["box", "zz"]),
    "case of host names": (
        {"config": "Host box\n  Port 10\nHost BOX\n  Port 11\nHost mixed\n"
                   "  HostName UPPER.Example.COM\nHost *.LAN\n  User lan\n"},
        ["box", "BOX", "Box", "mixed", "MIXED", "a.lan", "a.LAN"]),
    "negation and wildcards": (
        {"config": "Host * !bastion\n  Port 2\nHost gpu-?\n  User g\nHost *.lan !x.lan\n"
                   "  HostName %h.example\nHost !only-negated\n  User neg\n"},
        ["bastion", "other", "gpu-1", "gpu-12", "a.lan", "x.lan", "only-negated"]),
    "include relative to ~/.ssh, globbed in order": (
        {"config": "Include conf.d/*.conf\nHost box\n  Port 99\n  User late\n",
         "conf.d/20-b.conf": "Host box\n  Port 20\n  User zed\n",
         "conf.d/10-a.conf": "Host box\n  Port 10\n",
         "conf.d/ignored.txt": "Host *\n  Port 1\n"}, ["box", "other"]),
    "include with ~, absolute, and inside a Host block": (
        {"config": "Host box\n  Include inner\nInclude ~/.ssh/extra nothing-here\n"
                   "Host box\n  IdentityFile ~/.ssh/after\n",
         "inner": "Port 7\nHost *\n  User q\n",
         "extra": "Host box other\n  HostName from-extra\n"}, ["box", "other", "third"]),
    "match host sees HostName, originalhost the name given": (
        {"config": "Host box\n  HostName Real.Example\nMatch host real.example\n  Port 5\n"
                   "Match originalhost BOX\n  User orig\nMatch host box\n  User never\n"},
        ["box", "BOX", "real.example"]),
    "match user, from the command line or config": (
        {"config": "Match user alice\n  Port 6\nHost box\n  User bob\nMatch user bob\n"
                   "  HostName bobs-box\nMatch !user bob,alice\n  IdentityFile ~/.ssh/other\n"},
        [("box", "alice"), "box", ("x", "alice"), "x"]),
    "match all, localuser, negation, canonical": (
        {"config": "Match !host box\n  Port 3\nMatch canonical\n  User canon\n"
                   "Match !canonical host box\n  HostName notcanon\nMatch localuser rotest*\n"
                   "  IdentityFile ~/.ssh/local\nMatch all\n  User everyone\n"},
        ["box", "other"]),
    "match final: a second pass over the resolved HostName": (
        {"config": "Host box\n  HostName Real.Example\nHost real.example\n  User second\n"
                   "Match final host real.example\n  Port 8\nMatch canonical\n"
                   "  IdentityFile ~/.ssh/canon\nMatch !final\n  IdentityFile ~/.ssh/first\n"
                   "Match final all\n  Include final.d/*\n",
         "final.d/a": "HostName ignored.example\nHost real.example\n  ProxyJump late\n"},
        ["box", "real.example", "Other"]),
    "match final inside an include that does not apply still asks for the final pass": (
        {"config": "Host nomatch\n  Include never\nHost box\n  HostName h2\nHost h2\n  Port 9\n",
         "never": "Match final\n  User never\n"}, ["box", "nomatch"]),
    "proxyjump chains in order, hop configs, none": (
        {"config": "Host t\n  ProxyJump j1,bob@j2:2200\nHost j1\n  HostName 10.1.1.1\n"
                   "  User ju\n  ProxyJump j0\nHost j2\n  HostName 10.2.2.2\n"
                   "  ProxyJump ignored-for-j2\nHost j0\n  Port 2000\nHost n\n  ProxyJump none\n"
                   "Host jd\n  ProxyJump none\nHost *\n  ProxyJump ssh://deflt@jd:2022\n"},
        ["t", "n", "j2", "j1", "x"]),
    "proxycommand and proxyjump: the first wins": (
        {"config": "Host pc\n  ProxyCommand nc %h %p\nHost pj\n  ProxyJump jj\n"
                   "Host pq\n  ProxyCommand=sh -c \"nc  '%h' %p\"\n"
                   "Host jj later\n  ProxyJump none\nHost *\n  ProxyJump later\n"
                   "  ProxyCommand other %h\n"},
        ["pc", "pj", "pq"]),
    "proxyjump to IPv6 addresses and URIs": (
        {"config": "Host a\n  ProxyJump [::1]:2200\nHost b\n  ProxyJump u@x,ssh://h:22/\n"
                   "Host c\n  ProxyJump a@b@cc,h:\nHost * !a !b !c\n  ProxyJump none\n"},
        ["a", "b", "c"]),
    "syntax: =, quotes, comments, keyword case": (
        {"config": "# comment\nHOST=box\n  port=2022\n  HostName = \"quoted.example\"  # c\n"
                   "  IdentityFile \"~/.ssh/with space\" \n\tuser\tme\n"}, ["box"]),
    "command-line user and port win": (
        {"config": "Host box\n  User cfg\n  Port 1234\n"}, [("box", "cli", 4321)]),
}


@pytest.mark.parametrize("case", list(TABLE))
def test_resolution_equals_ssh_G(oracle, case):
    files, hosts = TABLE[case]
    oracle.write(files)
    for spec in hosts:
        host, user, port = (spec, None, None) if isinstance(spec, str) else \
            (list(spec) + [None])[:3]
        assert_same(oracle, host, user, port)


def test_proxyjump_chain_is_connected_in_openssh_order(oracle):
    oracle.write(TABLE["proxyjump chains in order, hop configs, none"][0])
    chain = oracle.ours("t").chain()
    assert [(h.hostname, h.port, h.user) for h in chain] == [
        ("jd", 2022, "deflt"), ("j0", 2000, oracle.local.name), ("10.1.1.1", 22, "ju"),
        ("10.2.2.2", 2200, "bob"),
        ("t", 22, oracle.local.name)]


TEMPLATES = ["~/.ssh/id_%r@%h:%p", "%d/k_%u_%n", "/k/%C", "/k/%i_%k_%L_%l", "/k/100%%",
             "/k/${ROTEST_VAR}/x", "~/k"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_tokens_expand_as_openssh_does(oracle, template):
    # ssh -G prints IdentityFile unexpanded but UserKnownHostsFile expanded, with the same tokens
    block = "Host t T\n  HostName Real.%h.Example\n  User u1\n  Port 2200\n"
    os.environ["ROTEST_VAR"] = "envval"
    try:
        for host, user in (("t", None), ("T", "other")):
            oracle.write({"config": block + f"  UserKnownHostsFile {template}\n"})
            want = oracle.g(host, user)["userknownhostsfile"][0]
            oracle.write({"config": block + f"  IdentityFile {template}\n"})
            assert oracle.ours(host, user).identity_files == [want]
    finally:
        del os.environ["ROTEST_VAR"]


@pytest.mark.parametrize("config, keyword", [
    ("Match exec \"true\"\n  Port 1\n", "Match exec"),
    ("Host box\n  CanonicalizeHostname yes\n", "CanonicalizeHostname"),
    ("Host box\n  ProxyCommand relay %h\n  ProxyUseFdpass yes\n", "ProxyUseFdpass"),
    ("Match host box localnetwork 10.0.0.0/8\n  Port 1\n", "Match localnetwork"),
    ("Match final exec true\n  Port 1\n", "Match exec"),
    ("Host box\n  ProxyJump %r@jump\n", "ProxyJump"),
    ("Host box\n  Port twenty\n", "Port"),
    ("Host *\n  ProxyJump a,,b\n", "ProxyJump"),
    ("Host *\n  ProxyJump h:0\n", "ProxyJump"),
    ("Host other\n  ProxyJump ssh://[fe80::2]\n", "ProxyJump"),  # refused anywhere, as by ssh
])
def test_unsupported_features_are_refused_naming_the_keyword(oracle, config, keyword):
    oracle.write({"config": config})
    with pytest.raises(ConfigError) as err:
        oracle.ours("box")
    message = str(err.value)
    assert keyword in message and "\n" not in message and "line" in message


def test_a_config_others_can_write_is_refused(oracle):
    oracle.write({"config": "Include extra\n", "extra": "Host box\n  HostName evil\n"})
    (oracle.config.parent / "extra").chmod(0o666)
    with pytest.raises(ConfigError, match="Bad owner or permissions"):
        oracle.ours("box")
    (oracle.config.parent / "extra").chmod(0o644)
    oracle.config.chmod(0o664)  # plain "ssh box" checks ~/.ssh/config too ("ssh -F" does not)
    with pytest.raises(ConfigError, match="Bad owner or permissions"):
        oracle.ours("box")


def test_unsupported_match_for_another_host_does_not_get_in_the_way(oracle):
    oracle.write({"config": "Match host other exec \"false\"\n  Port 1\nHost box\n  Port 5\n"})
    assert oracle.ours("box").port == 5


def test_command_line_user_reaches_match_user(home, project):
    from remoteops.common.config import load_settings
    from remoteops.laptop.targets import open_target

    (home / ".ssh" / "config").write_text(
        "Match user alice\n  HostName alices.example\n  Port 2201\n"
        "Host box\n  HostName box.example\n  User bob\n")
    settings = load_settings(project)
    conn = open_target(settings, "alice@box")._factory()
    assert (conn.host, conn.port, conn.user) == ("alices.example", 2201, "alice")
    conn = open_target(settings, "BOX")._factory()  # Host patterns are case-sensitive in ssh
    assert (conn.host, conn.port) == ("box", 22)


def test_unsupported_match_is_a_one_line_error_on_the_command_line(cli, home, project):
    (home / ".ssh" / "config").write_text('Host box\n  HostName 127.0.0.1\nMatch exec "true"\n'
                                          "  HostName elsewhere.example\n")
    res = cli("precheck", "--host", "box")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Match exec is not supported" in lines[0], res.stderr


def test_two_hop_proxyjump_connects_in_openssh_order(home, project, sshd_server):
    from remoteops.common.config import load_settings
    from remoteops.laptop.targets import open_target
    from tests.conftest import sshd_folder, trust
    from tests.harness.sshd import start_sshd

    j1 = start_sshd(sshd_folder(), host="127.0.0.2", client_key=sshd_server.client_key,
                    log_level="DEBUG1")
    j2 = start_sshd(sshd_folder(), host="127.0.0.3", client_key=sshd_server.client_key,
                    log_level="DEBUG1")
    try:
        for server in (j1, j2, sshd_server):
            trust(project, server)
        (home / ".ssh" / "config").write_text(
            f"Host inner\n  HostName {sshd_server.host}\n  Port {sshd_server.port}\n"
            f"  ProxyJump hop1,root@hop2:{j2.port}\n"
            f"Host hop1\n  HostName {j1.host}\n  Port {j1.port}\n"
            f"Host hop2\n  HostName {j2.host}\n  ProxyJump none-such-host\n"
            f"Host *\n  User root\n  IdentityFile {sshd_server.client_key}\n")
        settings = load_settings(project)
        with open_target(settings, "inner") as target:
            assert target.run("echo through").stdout.strip() == "through"
        # hop1 was connected first and forwarded to hop2, hop2 to the target
        assert f"to {j2.host} port {j2.port}" in j1.log(), j1.log()[-2000:]
        assert f"to {sshd_server.host} port {sshd_server.port}" in j2.log(), j2.log()[-2000:]
    finally:
        for server in (j1, j2):
            server.stop()
            shutil.rmtree(server.folder, ignore_errors=True)


RELAY = r'''
import os, socket, sys, threading
host, port, log = sys.argv[1:]  # "2>/dev/null" is the shell's, never an argument
port = int(port)
open(log, "a").write(f"{host} {port}\n")
s = socket.create_connection((host, port))
def up():
    while True:
        data = os.read(0, 65536)
        if not data:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(data)
threading.Thread(target=up, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    os.write(1, data)
'''


def test_proxycommand_runs_through_the_shell_with_tokens_expanded(home, project, sshd_server,
                                                                  tmp_path):
    import sys

    from remoteops.common.config import load_settings
    from remoteops.laptop.targets import open_target
    from tests.conftest import trust

    trust(project, sshd_server)
    relay, log = tmp_path / "relay.py", tmp_path / "relay.log"
    relay.write_text(RELAY)
    (home / ".ssh" / "config").write_text(
        f"Host viacmd\n  HostName {sshd_server.host}\n  Port {sshd_server.port}\n  User root\n"
        f"  IdentityFile {sshd_server.client_key}\n"
        f"  ProxyCommand {sys.executable} {relay} %h %p {log} 2>/dev/null\n")
    with open_target(load_settings(project), "viacmd") as target:
        assert target.run("echo relayed").stdout.strip() == "relayed"
    assert log.read_text() == f"{sshd_server.host} {sshd_server.port}\n"
