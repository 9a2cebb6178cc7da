"""fetch-model: the laptop's copy uploaded over a real sshd (only what differs, sha256-verified,
resumed after a cut connection, into the server's Hugging Face cache layout), and the server's
own download from its cache in offline mode (verified against the blobs' names)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.base_model import fakes
from tests.conftest import ssh_alias, trust

DATA = '{"instruction": "a", "output": "b"}\n'


def _project(project: Path, base_model: str) -> None:
    (project / "data").mkdir(exist_ok=True)
    (project / "data" / "s.jsonl").write_text(DATA)
    (project / "remoteops.toml").write_text(
        f'[train]\nbase_model = "{base_model}"\n[stages.s]\ndataset = "data/s.jsonl"\n')


@pytest.fixture
def box(cli, home, project, sshd_server, tmp_path):
    """fetch-model against the sshd as root; the server's project root is a tmp folder."""
    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)
    root = tmp_path / "server" / "proj"

    def run(*args, host="box", env=None, expect=0):
        res = cli("fetch-model", "--host", host, "--project-root", str(root), *args,
                  env={"REMOTEOPS_REMOTE_PYTHON": sys.executable, **(env or {})}, timeout=300)
        if expect is not None:
            assert res.returncode == expect, res.stdout + res.stderr
        return res

    run.root = root
    return run


def test_from_laptop_sends_only_what_differs_and_verifies_it(box, project):
    files = fakes.model_files(shards=2, floats=50_000)
    model = fakes.write_folder(project / "outputs" / "demo-model", files)
    _project(project, "outputs/demo-model")
    dest = box.root / "outputs" / "demo-model"
    res = box("--from-laptop")
    assert "outputs/demo-model: uploading 7 file(s), 400.4 KB, to box:" in res.stdout
    assert f"outputs/demo-model: sent 7 of 7 files" in res.stdout and "sha256 verified" in res.stdout
    assert fakes.tree(dest) == fakes.tree(model)
    assert not (dest / ".remoteops-incoming").exists()

    again = json.loads(box("--from-laptop", "--json").stdout)
    assert again["sent"] == [] and again["sent_bytes"] == 0

    # same size, other bytes (a bit flipped on the server): found by sha256, and only it goes
    shard = dest / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    (dest / "tokenizer_config.json").unlink()
    (dest / "notes.txt").write_text("mine\n")  # the server's own file is left alone
    out = json.loads(box("--from-laptop", "--json").stdout)
    assert sorted(out["sent"]) == ["model-00002-of-00002.safetensors", "tokenizer_config.json"]
    assert out["sent_bytes"] == len(files["model-00002-of-00002.safetensors"]) + \
        len(files["tokenizer_config.json"])
    assert {k: v for k, v in fakes.tree(dest).items() if k != "notes.txt"} == fakes.tree(model)
    assert (dest / "notes.txt").read_text() == "mine\n"


def test_an_upload_cut_half_way_resumes_where_it_stopped(box, project, sshd_server):
    from tests.harness.proxy import CutProxy

    files = {**fakes.model_files(), "model.safetensors": fakes.safetensors(1_500_000, seed=-1)}
    model = fakes.write_folder(project / "outputs" / "demo-model", files)
    _project(project, "outputs/demo-model")
    proxy = CutProxy((sshd_server.host, sshd_server.port))
    known = project / ".remoteops" / "known_hosts"
    known.write_text(known.read_text() + sshd_server.known_hosts_line.replace(
        f"]:{sshd_server.port} ", f"]:{proxy.port} "))
    with open(project / "remoteops.toml", "a") as fh:
        fh.write(f'[hosts.viaproxy]\nhost = "root@127.0.0.1:{proxy.port}"\n'
                 f'identity_file = "{sshd_server.client_key}"\n')
    env = {"REMOTEOPS_SSH__CONNECT_RETRIES": "0"}
    dest = box.root / "outputs" / "demo-model"
    try:
        proxy.arm(3_500_000)
        res = box("--from-laptop", host="viaproxy", env=env, expect=3)
        assert "broke during the upload" in res.stderr and "resumes" in res.stderr
        assert proxy.cuts == 1
        assert not (dest / "model.safetensors").exists()  # nothing half-written in place
        parts = list((dest / ".remoteops-incoming").glob("*.part"))
        assert len(parts) == 1 and 100_000 < parts[0].stat().st_size < 6_000_000
        already = parts[0].stat().st_size
        out = json.loads(box("--from-laptop", "--json", host="viaproxy", env=env).stdout)
    finally:
        proxy.close()
    assert out["sent_bytes"] <= len(files["model.safetensors"]) - already + 10_000
    assert fakes.tree(dest) == fakes.tree(model)


@pytest.fixture
def hf_server(tmp_path):
    """An sshd whose sessions get their own HF_HOME (as a server's profile would set it)."""
    from tests.conftest import sshd_folder
    from tests.harness.sshd import start_sshd

    hf = tmp_path / "server-hf"
    folder = sshd_folder()
    server = start_sshd(folder, extra_config=f"SetEnv HF_HOME={hf} HF_HUB_OFFLINE=1\n")
    server.hf = hf
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def test_a_laptop_hf_cache_lands_in_the_servers_hf_cache(cli, home, project, hf_server, tmp_path):
    """A server that reaches no hub: the laptop's cached snapshot becomes the server's
    (refs/main and all), so transformers finds it by its id there."""
    ssh_alias(home, "box", hf_server)
    trust(project, hf_server)
    laptop_hf = tmp_path / "laptop-hf"
    snap = fakes.write_hf_cache(laptop_hf / "hub", "org/tiny", fakes.model_files(2),
                                commit="d" * 40)
    _project(project, "org/tiny")
    env = {"REMOTEOPS_REMOTE_PYTHON": sys.executable, "HF_HOME": str(laptop_hf),
           "REMOTEOPS_PRECHECK__REQUIRED_PACKAGES": "click", "REMOTEOPS_GPU_GATE": "off",
           "REMOTEOPS_PRECHECK__OPTIONAL_PACKAGES": "", "REMOTEOPS_PRECHECK__MIN_DISK_GB": "0.01",
           "REMOTEOPS_PRECHECK__MIN_RAM_GB": "0.1"}
    where = ("--host", "box", "--project-root", str(tmp_path / "server" / "proj"))
    # before: not in the server's cache, and no hub (offline): precheck names the upload
    res = cli("precheck", *where, "--json", env=env, timeout=300)
    row = next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "base model")
    assert row["status"] == "fail" and "org/tiny is not in the server's Hugging Face cache" in \
        row["value"]
    assert "run `invoke fetch-model --host box --from-laptop`" in row["hint"]

    res = cli("fetch-model", *where, "--from-laptop", env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    repo = hf_server.hf / "hub" / "models--org--tiny"
    assert fakes.tree(repo / "snapshots" / ("d" * 40)) == fakes.tree(snap)
    assert (repo / "refs" / "main").read_text() == "d" * 40

    res = cli("precheck", *where, "--json", env=env, timeout=300)
    row = next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "base model")
    assert row["status"] == "ok" and "in the server's Hugging Face cache" in row["value"], row


def test_download_on_the_server_from_its_cache_offline_and_verified(cli, project, tmp_path):
    hf = tmp_path / "hf"
    snap = fakes.write_hf_cache(hf / "hub", "org/tiny", fakes.model_files(2))
    _project(project, "org/tiny")
    env = {"HF_HOME": str(hf), "HF_HUB_OFFLINE": "1"}
    where = ("--host", "local", "--project-root", str(tmp_path / "server"))
    res = cli("fetch-model", *where, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"org/tiny: already in the cache on the server: 7 files" in res.stdout
    assert str(snap) in res.stdout and "sha256 verified" in res.stdout
    state = json.loads((tmp_path / "server" / ".remoteops" / "model-fetch.json").read_text())
    assert state["status"] == "done" and state["path"] == str(snap)

    # a blob whose bytes do not match its name (sha256) is caught and removed
    blob = Path(os.path.realpath(snap / "model-00001-of-00002.safetensors"))
    blob.write_bytes(b"x" + blob.read_bytes()[1:])
    res = cli("fetch-model", *where, env=env, timeout=300)
    assert res.returncode == 2
    assert "1 file(s) of org/tiny did not match their sha256 (model-00001-of-00002.safetensors)" \
        in res.stderr and not blob.exists()

    # not cached, offline: one line with the way out
    res = cli("fetch-model", *where, env={**env, "HF_HOME": str(tmp_path / "empty")}, timeout=300)
    assert res.returncode == 2
    assert "cannot download org/tiny from https://huggingface.co (HF_HUB_OFFLINE is set)" in \
        res.stderr and "--from-laptop" in res.stderr
    assert res.stderr.count("\n") == 1


def test_a_hub_id_missing_from_the_laptop_says_so(box, project):
    _project(project, "hf:org/absent")
    res = box("--from-laptop", env={"HF_HOME": str(project / "no-hf")}, expect=2)
    assert "there is no copy of hf:org/absent on this laptop (this laptop's Hugging Face cache)" \
        in res.stderr


def test_help_describes_the_flags(cli):
    res = cli("fetch-model", "--help")
    assert res.returncode == 0
    for flag in ("--host", "--from-laptop", "--source", "--json", "--project-root"):
        assert flag in res.stdout
