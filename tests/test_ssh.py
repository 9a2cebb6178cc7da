"""SSH targets against a real sshd: host keys, refused keys, wrong ports, noisy shells."""

import json
import shutil
import subprocess
import sys

from remoteops.common.config import load_settings
from remoteops.laptop.targets import open_target
from tests.conftest import ssh_alias, trust

# Every check passes on a CPU machine with these (the GPU gate is tested elsewhere).
QUIET = {"REMOTEOPS_GPU_GATE": "off", "REMOTEOPS_PRECHECK__MIN_DISK_GB": "0.01",
         "REMOTEOPS_PRECHECK__MIN_RAM_GB": "0.1", "REMOTEOPS_REMOTE_PYTHON": sys.executable,
         "REMOTEOPS_PROJECT_ROOT": "/tmp",
        # importing peft and transformers on the server takes seconds; these tests judge
        # the rest (tests of the package rows set their own lists)
        "REMOTEOPS_PRECHECK__REQUIRED_PACKAGES": "click", "REMOTEOPS_PRECHECK__OPTIONAL_PACKAGES": ""}


def test_unknown_host_key_is_refused_until_trusted(cli, home, project, sshd_server):
    ssh_alias(home, "box", sshd_server)
    res = cli("precheck", "--host", "box", env=QUIET)
    assert res.returncode == 3
    assert "unknown host key" in res.stderr and "--trust-host" in res.stderr
    fp = subprocess.run(["ssh-keygen", "-l", "-f", str(sshd_server.folder / "host_key.pub")],
                        capture_output=True, text=True, check=True).stdout.split()[1]
    assert fp in res.stderr  # the same fingerprint OpenSSH shows
    assert not (project / ".remoteops" / "known_hosts").exists()

    res = cli("precheck", "--host", "box", "--trust-host", env=QUIET)
    assert res.returncode == 0, res.stdout + res.stderr
    recorded = (project / ".remoteops" / "known_hosts").read_text()
    assert recorded == sshd_server.known_hosts_line
    res = cli("precheck", "--host", "box", "--json", env=QUIET)
    assert res.returncode == 0 and json.loads(res.stdout)["ok"] is True


def test_changed_host_key_is_refused_even_with_trust_host(cli, home, project, sshd_server,
                                                          tmp_path):
    ssh_alias(home, "box", sshd_server)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    kind, blob = (tmp_path / "k.pub").read_text().split()[:2]
    known = project / ".remoteops" / "known_hosts"
    known.parent.mkdir(parents=True)
    known.write_text(f"[{sshd_server.host}]:{sshd_server.port} {kind} {blob}\n")
    before = known.read_bytes()
    res = cli("precheck", "--host", "box", "--trust-host", env=QUIET)
    assert res.returncode == 3
    assert "CHANGED" in res.stderr and "Traceback" not in res.stderr
    assert known.read_bytes() == before


def test_host_key_in_users_known_hosts_is_accepted(cli, home, sshd_server):
    ssh_alias(home, "box", sshd_server)
    (home / ".ssh" / "known_hosts").write_text(sshd_server.known_hosts_line)
    res = cli("precheck", "--host", "box", env=QUIET)
    assert res.returncode == 0, res.stderr


def test_refused_key_is_one_clear_line(cli, home, project, sshd_server, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "wrong")],
                   check=True)
    trust(project, sshd_server)
    (home / ".ssh" / "config").write_text(
        f"Host box\n  HostName {sshd_server.host}\n  Port {sshd_server.port}\n  User root\n"
        f"  IdentityFile {tmp_path / 'wrong'}\n  IdentitiesOnly yes\n")
    res = cli("precheck", "--host", "box", env=QUIET)
    assert res.returncode == 3
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused our SSH key" in lines[0] and "authorized_keys" in lines[0]


def test_wrong_port_and_unknown_host(cli, project, sshd_server):
    from tests.harness.sshd import free_port

    env = dict(QUIET, REMOTEOPS_SSH__CONNECT_RETRIES="1", REMOTEOPS_SSH__RETRY_BACKOFF="0.1")
    res = cli("precheck", "--host", f"root@127.0.0.1:{free_port('127.0.0.1')}", env=env)
    assert res.returncode == 3 and "connection refused" in res.stderr
    assert "check the port" in res.stderr
    res = cli("precheck", "--host", "gpu.invalid", env=env)
    assert res.returncode == 3 and "cannot resolve host name 'gpu.invalid'" in res.stderr


def test_named_host_from_project_config(cli, project, sshd_server):
    trust(project, sshd_server)
    (project / "remoteops.toml").write_text(
        f'[hosts.gpu]\nhost = "{sshd_server.host}"\nport = {sshd_server.port}\nuser = "root"\n'
        f'identity_file = "{sshd_server.client_key}"\n')
    res = cli("precheck", "--host", "gpu", "--json", env=QUIET)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["target"] == "gpu"


def _precheck_as(cli, project, sshd_server, user):
    res = cli("precheck", "--host", f"{user}@{sshd_server.host}:{sshd_server.port}", "--json",
              env={"REMOTEOPS_GPU_GATE": "warn", "REMOTEOPS_REMOTE_PYTHON": "/usr/bin/python3",
                   "REMOTEOPS_PRECHECK__MIN_DISK_GB": "0.01"}, timeout=180)
    assert res.returncode in (0, 1), res.stderr
    return json.loads(res.stdout)


def test_precheck_through_a_noisy_slow_login_shell_matches_a_quiet_one(
        cli, home, project, sshd_server, login_user):
    trust(project, sshd_server)
    (home / ".ssh" / "config").write_text(f"Host *\n  IdentityFile {sshd_server.client_key}\n")
    quiet = login_user("")
    noisy = login_user('echo "Welcome to GPU box! (banner on stdout)"\n'
                       'echo "motd on stderr" >&2\nsleep 0.5\n')
    a = _precheck_as(cli, project, sshd_server, quiet)
    b = _precheck_as(cli, project, sshd_server, noisy)
    strip = lambda r: [(c["name"], c["status"]) for c in r["checks"]]  # noqa: E731
    assert strip(a) == strip(b)
    values = lambda r: {c["name"]: c["value"] for c in r["checks"]  # noqa: E731
                        if c["name"] in ("python", "gpu driver", "datasets")}
    assert values(a) == values(b)
    assert ("gpu driver", "warn") in strip(a)


def test_sftp_transfers_survive_a_noisy_login_shell(home, project, sshd_server, login_user,
                                                     tmp_path):
    trust(project, sshd_server)
    noisy = login_user('echo "Welcome! banner on stdout"\n')
    settings = load_settings(project, env={"REMOTEOPS_REMOTE_PYTHON": "/usr/bin/python3"})
    (home / ".ssh" / "config").write_text(f"Host *\n  IdentityFile {sshd_server.client_key}\n")
    payload = bytes(range(256)) * 4096
    src = tmp_path / "blob.bin"
    src.write_bytes(payload)
    with open_target(settings, f"{noisy}@{sshd_server.host}:{sshd_server.port}") as target:
        target.put(src, "~/sub/dir/blob.bin")
        target.write_bytes("~/sub/state.json", b'{"a": 1}')
        target.get("~/sub/dir/blob.bin", tmp_path / "back.bin")
        assert target.read_bytes("~/sub/state.json") == b'{"a": 1}'
        assert target.run_python("result = payload * 2", 21) == 42
    assert (tmp_path / "back.bin").read_bytes() == payload
    assert open(f"/home/{noisy}/sub/dir/blob.bin", "rb").read() == payload


def test_proxyjump_from_ssh_config_goes_through_the_jump_host(cli, home, project, sshd_server,
                                                               tmp_path):
    from tests.conftest import sshd_folder
    from tests.harness.sshd import start_sshd

    jump = start_sshd(sshd_folder(), host="127.0.0.2", client_key=sshd_server.client_key,
                      log_level="DEBUG1")
    try:
        (home / ".ssh" / "config").write_text(
            f"Host jumpbox\n  HostName {jump.host}\n  Port {jump.port}\n  User root\n"
            f"  IdentityFile {jump.client_key}\n"
            f"Host inner\n  HostName {sshd_server.host}\n  Port {sshd_server.port}\n"
            f"  User root\n  IdentityFile {sshd_server.client_key}\n  ProxyJump jumpbox\n")
        res = cli("precheck", "--host", "inner", env=QUIET)
        assert res.returncode == 3 and "unknown host key" in res.stderr
        assert f"[{jump.host}]:{jump.port}" in res.stderr  # the jump host is verified first
        res = cli("precheck", "--host", "inner", "--trust-host", env=QUIET)
        assert res.returncode == 0, res.stderr
        known = (project / ".remoteops" / "known_hosts").read_text()
        assert jump.known_hosts_line in known and sshd_server.known_hosts_line in known
        # the jump server forwarded a TCP connection to the inner server's port
        assert "direct-tcpip" in jump.log() and f"port {sshd_server.port}" in jump.log()
    finally:
        jump.stop()
        shutil.rmtree(jump.folder, ignore_errors=True)
