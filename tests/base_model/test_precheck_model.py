"""precheck's base-model row: a folder (complete or not), a hub id in the server's cache, a hub
or mirror that answers (a tiny local http.server), one that does not (a closed port), offline
mode, and the disk. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from remoteops.common.config import load_settings
from remoteops.common.target import LocalTarget
from remoteops.plugins import PluginManager, builtin_dir, load_file
from remoteops.precheck import run_precheck
from tests.base_model import fakes
from tests.harness.sshd import free_port

DATA = '{"instruction": "a", "output": "b"}\n'


class Hub(BaseHTTPRequestHandler):
    """What a hub (or a mirror) answers: models by id, each with its files and sizes."""

    models: dict[str, dict[str, int]] = {}

    def log_message(self, *args):
        pass

    def _model(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            return "/".join(parts[2:4]), "api"
        return "/".join(parts[:2]), "resolve"

    def do_HEAD(self):
        repo, _ = self._model()
        if repo in self.models:
            self.send_response(302)  # as huggingface.co: a redirect to its CDN
            self.send_header("Location", "http://cdn.invalid/x")
        else:
            self.send_response(404)
        self.end_headers()

    def do_GET(self):
        repo, kind = self._model()
        if kind != "api" or repo not in self.models:
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps({"id": repo, "siblings": [{"rfilename": n, "size": s}
                                                    for n, s in self.models[repo].items()]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())


@pytest.fixture
def hub():
    Hub.models = {"org/big": {"config.json": 500, "model.safetensors": 3 * 10**9,
                              "pytorch_model.bin": 3 * 10**9, "tokenizer.json": 100},
                  "org/huge": {"config.json": 500, "model.safetensors": 10**17}}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def check(tmp_path, monkeypatch):
    """Run only the base-model check against a local 'server' root (its own HF_HOME)."""
    laptop = tmp_path / "laptop"
    (laptop / "data").mkdir(parents=True)
    (laptop / "data" / "s.jsonl").write_text(DATA)
    server = tmp_path / "server"
    server.mkdir()
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN",
                 "MODELSCOPE_CACHE", "MODELSCOPE_DOMAIN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port('127.0.0.1')}")  # closed
    pm = PluginManager()
    path = builtin_dir() / "base_model.py"
    pm.register_module(load_file(path, "base_model"), "base_model", "builtin", str(path), "t")

    def run(base_model: str, extra: str = "", host: str = "gpu") -> dict[str, dict]:
        (laptop / "remoteops.toml").write_text(
            f'[train]\nbase_model = "{base_model}"\n[stages.s]\ndataset = "data/s.jsonl"\n'
            f"[plugins.base_model]\ntimeout_seconds = 3\n{extra}")
        settings = load_settings(laptop, env={})
        target = LocalTarget(host, str(server), sys.executable)
        return {r.name: r.to_dict() for r in run_precheck(settings, target, pm)}

    run.laptop, run.server, run.hf = laptop, server, tmp_path / "hf" / "hub"
    return run


def test_the_demo_model_only_on_the_laptop_fails_and_names_the_fix(check):
    fakes.write_folder(check.laptop / "outputs" / "demo-model", fakes.model_files(2))
    rows = check("outputs/demo-model")
    row = rows["base model"]
    assert row["status"] == "fail"
    assert row["value"] == (f"outputs/demo-model is not on the server (no folder "
                            f"{check.server}/outputs/demo-model)")
    assert row["hint"].startswith("run `invoke fetch-model --host gpu --from-laptop`")
    assert "remote-train does it by itself" in row["hint"]
    assert rows["base model disk"]["status"] == "ok"
    # once it is there (complete), the row is ok
    fakes.write_folder(check.server / "outputs" / "demo-model", fakes.model_files(2))
    rows = check("outputs/demo-model")
    assert rows["base model"]["status"] == "ok" and "7 files" in rows["base model"]["value"]
    assert "base model disk" not in rows


def test_an_incomplete_folder_names_what_is_missing(check):
    files = fakes.model_files(3)
    fakes.write_folder(check.laptop / "models" / "m", files)
    del files["model-00002-of-00003.safetensors"]
    fakes.write_folder(check.server / "models" / "m", files)
    row = check("./models/m")["base model"]
    assert row["status"] == "fail"
    assert "incomplete: 1 of 3 weight shards missing (model-00002-of-00003.safetensors)" in \
        row["value"]
    assert "--from-laptop" in row["hint"]


def test_a_folder_nowhere_says_how_to_fix_the_setting(check):
    row = check("/nowhere/model")["base model"]
    assert row["status"] == "fail" and "no folder /nowhere/model" in row["value"]
    assert "fix train.base_model" in row["hint"]


def test_a_hub_id_in_the_servers_cache_passes_offline(check, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = fakes.write_hf_cache(check.hf, "org/tiny", fakes.model_files(2))
    row = check("org/tiny")["base model"]
    assert row["status"] == "ok" and str(snap) in row["value"], row
    # a shard whose blob never arrived: incomplete, and offline there is no hub to ask
    Path(os.path.realpath(snap / "model-00001-of-00002.safetensors")).unlink()
    row = check("org/tiny")["base model"]
    assert row["status"] == "fail" and "cache is incomplete (1 of 2 weight shards missing" in \
        row["value"]
    assert "HF_ENDPOINT" in row["hint"]


def test_a_hub_id_neither_cached_nor_reachable(check):
    row = check("hf:org/tiny")["base model"]
    assert row["status"] == "fail"
    assert row["value"].startswith("org/tiny is not in the server's Hugging Face cache, and "
                                   "http://127.0.0.1:")
    assert "cannot be reached from the server (ConnectionRefusedError" in row["value"]
    assert "set HF_ENDPOINT on the server to a mirror" in row["hint"]
    assert "--from-laptop" not in row["hint"]  # a local target: this machine is the server
    # a bare org/name whose first part is a folder of the project: it may have meant a folder
    assert check("org/tiny")["base model"]["value"].startswith("org/tiny is not in the server's")
    (check.laptop / "models").mkdir()
    row = check("models/tiny")["base model"]
    assert row["value"].startswith(f"models/tiny: no folder {check.server}/models/tiny on the "
                                   "server nor models/tiny in its Hugging Face cache, and http://")
    assert "set HF_ENDPOINT on the server to a mirror" in row["hint"]


def test_offline_mode_is_named(check, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    row = check("org/tiny")["base model"]
    assert row["status"] == "fail" and "(HF_HUB_OFFLINE is set)" in row["value"]


def test_a_mirror_that_has_it_gives_its_size_and_checks_the_disk(check, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub)
    rows = check("org/big")
    row = rows["base model"]
    assert row["status"] == "warn"
    # 3 GB of safetensors and 600 B of the rest; the .bin twin of the weights is not counted
    assert f"{hub} has it (3.0 GB); the first training stage downloads it" in row["value"]
    assert row["hint"] == "run `invoke fetch-model --host gpu` to download it now (resumable, " \
                          "verified)"
    assert rows["base model disk"]["status"] == "ok"
    assert "the download needs 3.0 GB" in rows["base model disk"]["value"]
    disk = check("org/huge")["base model disk"]
    assert disk["status"] == "fail" and "the download needs 100000000.0 GB" in disk["value"]


def test_a_mirror_without_it_says_so(check, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub)
    row = check("hf:org/nothing")["base model"]
    assert row["status"] == "fail" and f"{hub} has no model org/nothing" in row["value"]
    # a bare org/name that is neither a folder nor on the hub names both
    (check.laptop / "outputs").mkdir()
    row = check("outputs/nothing")["base model"]
    assert row["value"] == (f"outputs/nothing: no folder {check.server}/outputs/nothing on the "
                            f"server, and {hub} has no model outputs/nothing")


def test_modelscope_cache_and_unreachable_domain(check, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.setenv("MODELSCOPE_DOMAIN", f"127.0.0.1:{free_port('127.0.0.1')}")
    row = check("modelscope:Qwen/Qwen2.5-0.5B")["base model"]
    assert row["status"] == "fail" and "cannot be reached" in row["value"]
    assert "MODELSCOPE_DOMAIN" in row["hint"]
    fakes.write_folder(tmp_path / "ms" / "models" / "Qwen" / "Qwen2___5-0___5B",
                      fakes.model_files())
    row = check("modelscope:Qwen/Qwen2.5-0.5B")["base model"]
    assert row["status"] == "ok" and "ModelScope cache" in row["value"]


def test_command_stages_only_skip_the_check(check):
    (check.laptop / "remoteops.toml").write_text('[stages.mine]\ncommand = "true"\n')
    settings = load_settings(check.laptop, env={})
    pm = PluginManager()
    path = builtin_dir() / "base_model.py"
    pm.register_module(load_file(path, "base_model"), "base_model", "builtin", str(path), "t")
    rows = run_precheck(settings, LocalTarget("gpu", str(check.server), sys.executable), pm)
    assert [(r.name, r.status) for r in rows] == [("base model", "skip")]


def test_a_bad_value_fails_in_one_line(check):
    row = check("hf:not-an-id")["base model"]
    assert row["status"] == "fail" and "not a valid hub id" in row["value"]
