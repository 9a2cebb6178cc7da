"""fetch-model downloads on the server from a hub or mirror (HF_ENDPOINT): a tiny local hub
(``fakehub``), never the network. Weights for other runtimes are left out; a download whose
connection keeps breaking fails in one line, and the next one fetches only what is missing
(a cut or two on the way is retried); the result is complete and verified."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.base_model import fakes
from tests.base_model.fakehub import FakeHub

pytest.importorskip("huggingface_hub")


@pytest.fixture
def hub():
    files = {**fakes.model_files(1, floats=400_000, seed=3), "pytorch_model.bin": b"x" * 5000,
             "original/consolidated.00.pth": b"y" * 5000}
    server = FakeHub({"org/tiny": files})
    server.files = files
    yield server
    server.close()


def test_download_from_a_mirror_is_retried_resumed_and_verified(cli, project, tmp_path, hub):
    (project / "remoteops.toml").write_text(
        '[train]\nbase_model = "org/tiny"\n[stages.s]\ndataset = "data/s.jsonl"\n')
    hf = tmp_path / "server-hf"
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(hf)}
    where = ("fetch-model", "--host", "local", "--project-root", str(tmp_path / "server"))
    hub.cut_after, hub.cuts_left = 600_000, 100  # every try of the weights breaks
    res = cli(*where, env=env, timeout=300)
    assert res.returncode == 2
    assert res.stderr.startswith(f"error: cannot download org/tiny from {hub.url} (")
    assert "set HF_ENDPOINT on the server to a mirror" in res.stderr
    assert res.stderr.count("\n") == 1
    state = json.loads((tmp_path / "server" / ".remoteops" / "model-fetch.json").read_text())
    assert state["status"] == "failed" and state["total_bytes"] == sum(
        len(d) for n, d in hub.files.items() if not n.endswith((".bin", ".pth")))

    # the next run fetches only what is missing; a cut or two is retried on the way
    hub.cuts_left, hub.log[:] = 2, []
    res = cli(*where, "--json", env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["files"] == 5 and not out["already"]  # no .bin twin, no original/*.pth
    got = [p.rsplit("/", 1)[1] for m, p, r in hub.log if m == "GET" and "/resolve/" in p]
    assert got == ["model.safetensors"] * 3  # the other files were already there
    snap = Path(out["dest"])
    assert snap.parent.name == "snapshots" and (snap.parent.parent / "refs" / "main").is_file()
    want = {n: hashlib.sha256(d).hexdigest() for n, d in hub.files.items()
            if not n.endswith((".bin", ".pth"))}
    assert fakes.tree(snap) == want
    state = json.loads((tmp_path / "server" / ".remoteops" / "model-fetch.json").read_text())
    assert state["status"] == "done" and state["done_bytes"] == state["total_bytes"]
