"""precheck: the GPU gate levels, one round trip, datasets, a server without remoteops."""

import json
import shutil
import sys

import pytest

from tests.conftest import ssh_alias, trust

pytestmark = pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                                reason="these tests describe a machine with no NVIDIA driver")

BASE = {"REMOTEOPS_PRECHECK__MIN_DISK_GB": "0.01", "REMOTEOPS_PRECHECK__MIN_RAM_GB": "0.1",
        "REMOTEOPS_REMOTE_PYTHON": sys.executable,
        # importing peft and transformers on the server takes seconds; these tests judge
        # the rest (tests of the package rows set their own lists)
        "REMOTEOPS_PRECHECK__REQUIRED_PACKAGES": "click", "REMOTEOPS_PRECHECK__OPTIONAL_PACKAGES": ""}


@pytest.fixture
def box(cli, home, project, sshd_server):
    """precheck over SSH as root, with the toolkit's own Python on the server."""
    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)
    root = project / "remote-root"
    root.mkdir()

    def run(*args, env=None):
        return cli("precheck", "--host", "box", "--project-root", str(root), *args,
                   env=dict(BASE, **(env or {})), timeout=180)

    return run


def rows(res):
    return {c["name"]: c for c in json.loads(res.stdout)["checks"]}


def test_gpu_gate_strict_fails_without_a_driver(box):
    res = box("--gpu-gate", "strict", "--json")
    assert res.returncode == 1
    driver = rows(res)["gpu driver"]
    assert driver["status"] == "fail" and "nvidia-smi not found" in driver["value"]
    assert "--gpu-gate warn" in driver["hint"]
    table = box("--gpu-gate", "strict")
    assert table.returncode == 1 and "FAILED" in table.stdout and "no NVIDIA driver" in table.stdout


def test_gpu_gate_warn_passes_with_a_warning_row(box):
    res = box("--gpu-gate", "warn", "--json")
    assert res.returncode == 0, res.stdout
    data = json.loads(res.stdout)
    assert data["ok"] is True and data["gpu_gate"] == "warn"
    assert rows(res)["gpu driver"]["status"] == "warn"
    assert all(c["status"] != "fail" for c in data["checks"])


def test_gpu_gate_off_skips_the_gate(box):
    res = box("--gpu-gate", "off", "--json")
    assert res.returncode == 0, res.stdout
    gate = rows(res)["gpu gate"]
    assert gate["status"] == "skip" and "gate off" in gate["value"]
    assert "gpu driver" not in rows(res)


def test_gate_level_from_env_and_flag_beats_it(box):
    assert box(env={"REMOTEOPS_GPU_GATE": "off"}).returncode == 0
    assert box("--gpu-gate", "strict", env={"REMOTEOPS_GPU_GATE": "off"}).returncode == 1


def test_datasets_missing_malformed_and_valid(box, project):
    root = project / "remote-root"
    (root / "data").mkdir()
    (root / "data" / "ok.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 3)
    (root / "data" / "bad.jsonl").write_text('{"messages": []}\n{"messages": [\n')
    (project / "remoteops.toml").write_text(
        '[stages.style]\ndataset = "data/ok.jsonl"\neval_set = "data/missing.jsonl"\n'
        '[stages.writing]\ndataset = "data/bad.jsonl"\n')
    res = box("--gpu-gate", "off", "--json")
    assert res.returncode == 1
    r = rows(res)
    assert r["dataset data/ok.jsonl"]["status"] == "ok" and r["dataset data/ok.jsonl"]["value"] == "3 rows"
    assert r["dataset data/missing.jsonl"]["status"] == "fail"
    bad = r["dataset data/bad.jsonl"]
    assert bad["status"] == "fail" and bad["value"].startswith("data/bad.jsonl:2:")


def test_disk_threshold_fails_with_hint(box):
    res = box("--gpu-gate", "off", "--json", env={"REMOTEOPS_PRECHECK__MIN_DISK_GB": "1e9"})
    assert res.returncode == 1
    assert rows(res)["disk"]["status"] == "fail" and "min_disk_gb" in rows(res)["disk"]["hint"]


def test_one_ssh_round_trip_on_a_server_without_remoteops(cli, home, project, sshd_server,
                                                           login_user):
    # Every shell the server starts appends a line: precheck must start exactly one.
    user = login_user('echo started >> ~/shell_starts\n')
    trust(project, sshd_server)
    (home / ".ssh" / "config").write_text(f"Host *\n  IdentityFile {sshd_server.client_key}\n")
    res = cli("precheck", "--host", f"{user}@{sshd_server.host}:{sshd_server.port}", "--json",
              env={"REMOTEOPS_REMOTE_PYTHON": "/usr/bin/python3", "REMOTEOPS_GPU_GATE": "warn",
                   "REMOTEOPS_PRECHECK__MIN_DISK_GB": "0.01"}, timeout=180)
    assert res.returncode == 1  # torch, transformers and peft are missing there
    r = rows(res)
    assert r["python"]["status"] == "ok" and "/usr/bin/python3" in r["python"]["value"]
    assert r["package torch"]["status"] == "fail"
    assert "pip install torch" in r["package torch"]["hint"]
    assert r["project root"]["status"] == "warn"  # ~/proj does not exist yet
    with open(f"/home/{user}/shell_starts") as fh:
        assert fh.read().splitlines() == ["started"]


def test_local_target_needs_no_server(cli, project):
    res = cli("precheck", "--host", "local", "--gpu-gate", "warn", "--json", env=BASE)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(res.stdout)
    assert data["target"] == "local" and rows(res)["project root"]["value"].startswith(str(project))
