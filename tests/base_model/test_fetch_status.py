"""`invoke status` shows the base model's download (fetch-model, detached on the server): the
real fetch code downloads from a slowed fake hub (``fakehub``) through the local target, and
status shows its bytes, share and speed while it runs, its failure afterwards, and nothing once
it is done (with no run yet it keeps its own message)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from tests.base_model import fakes
from tests.base_model.fakehub import FakeHub

pytest.importorskip("huggingface_hub")

LINE = re.compile(r"base model: fetching org/tiny, [\d.]+ [KM]?B of 12\.0 MB \((\d+)%\), "
                  r"[\d.]+ [KM]?B/s")


def slowed(hub: FakeHub, limit: list) -> None:
    """Every answer of ``hub`` sent at ``limit[0]`` bytes a second (None: at full speed)."""
    base = hub.server.RequestHandlerClass

    class Slow(base):
        def setup(self):
            super().setup()
            raw = self.wfile

            class Throttled:
                def write(self, data):
                    view = memoryview(data)
                    for i in range(0, len(view), 32768):
                        raw.write(view[i:i + 32768])
                        if limit[0] and len(view) > 4096:
                            time.sleep(min(32768, len(view) - i) / limit[0])
                    return len(view)

                def __getattr__(self, name):
                    return getattr(raw, name)

            self.wfile = Throttled()

    hub.server.RequestHandlerClass = Slow


@pytest.fixture
def hub():
    files = fakes.model_files(1, floats=3_000_000, seed=5)  # 12.0 MB
    server = FakeHub({"org/tiny": files, "org/broken": fakes.model_files(1, floats=400_000)})
    server.files = files
    yield server
    server.close()


def _agent_fetch(root: Path, ref: str, env: dict) -> dict:
    """What the laptop's fetch-model starts on the server: the detached download."""
    res = subprocess.run([sys.executable, "-m", "remoteops.agent", "fetch-model", "--root",
                          str(root), "--ref", ref, "--json"], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads((root / ".remoteops" / "model-fetch.json").read_text())


def test_status_shows_the_download_while_it_runs_and_when_it_failed(cli, project, tmp_path,
                                                                     hub):
    (project / "remoteops.toml").write_text(
        '[train]\nbase_model = "org/tiny"\n[stages.s]\ndataset = "data/s.jsonl"\n')
    root = tmp_path / "server"
    root.mkdir()
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "server-hf")}
    where = ("status", "--host", "local", "--project-root", str(root))
    total = sum(len(d) for d in hub.files.values())

    # no run and no download: status says what it said before, and nothing of a model
    res = cli(*where, env=env)
    assert res.returncode != 0 and "no pipeline runs under" in res.stderr, res.stderr
    assert "base model" not in res.stdout + res.stderr

    limit = [300_000]
    slowed(hub, limit)
    _agent_fetch(root, "org/tiny", env)
    deadline, seen = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        res = cli(*where, "--json", env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        data = json.loads(res.stdout)
        fetch = data["base_model"]
        if fetch and fetch.get("rate_bytes_per_s") and fetch["done_bytes"] > 0:
            seen = data
            break
        time.sleep(0.5)
    assert seen, "status never showed the download's progress"
    assert seen["run_id"] is None and seen["status"] == "none" and seen["stages"] == []
    fetch = seen["base_model"]
    assert fetch["status"] == "running" and fetch["total_bytes"] == total
    assert 0 < fetch["done_bytes"] < total and 30_000 < fetch["rate_bytes_per_s"] < 3_000_000
    assert LINE.fullmatch(fetch["line"]), fetch["line"]

    res = cli(*where, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    shown = [l for l in res.stdout.splitlines() if l.startswith("base model:")]
    assert len(shown) == 1 and LINE.fullmatch(shown[0]), res.stdout
    assert "no pipeline runs yet; start one with 'invoke remote-train'" in res.stdout

    limit[0] = None  # the rest at full speed; once done, status shows nothing of it
    deadline = time.monotonic() + 120
    state = {}
    while time.monotonic() < deadline:
        state = json.loads((root / ".remoteops" / "model-fetch.json").read_text())
        if state["status"] not in ("starting", "running"):
            break
        time.sleep(0.3)
    assert state["status"] == "done", state
    res = cli(*where, env=env)
    assert res.returncode != 0 and "no pipeline runs under" in res.stderr
    assert "base model" not in res.stdout + res.stderr

    # a download that failed (every try of the weights cut) is shown, with why
    hub.cut_after, hub.cuts_left = 100_000, 1000
    deadline = time.monotonic() + 120
    _agent_fetch(root, "org/broken", env)
    while time.monotonic() < deadline:
        state = json.loads((root / ".remoteops" / "model-fetch.json").read_text())
        if state["status"] not in ("starting", "running"):
            break
        time.sleep(0.3)
    assert state["status"] == "failed", state
    res = cli(*where, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"base model: fetching org/broken failed (just now): cannot download org/broken " \
           f"from {hub.url} (" in " ".join(res.stdout.split())


def test_the_follow_view_and_a_runs_status_show_the_line():
    """The laptop's rendering of pipeline-status with a run and a download under way."""
    from remoteops.laptop.remote_train_cli import render_status

    data = {"run_id": "run_1", "host": "gpu", "status": "running", "current": {},
            "stages": [{"name": "precheck", "status": "running", "attempt": 1}],
            "log_tail": [], "base_model": {
                "status": "running", "line": "base model: fetching Qwen/Qwen3-8B, 1.2 GB of "
                "16.4 GB (7%), 35.0 MB/s\x1b[2J"}}
    console = Console(record=True, width=200)
    console.print(render_status(data))
    text = console.export_text()
    assert "run_1 on gpu" in text and "precheck" in text
    assert "base model: fetching Qwen/Qwen3-8B, 1.2 GB of 16.4 GB (7%), 35.0 MB/s?" in text
    assert "\x1b" not in text  # the server's text, without its control characters
    # an older agent (no base_model), or none running: no line
    console = Console(record=True, width=200)
    console.print(render_status({**data, "base_model": None}))
    assert "base model" not in console.export_text()


def test_the_plain_follower_prints_the_download_when_it_starts_and_ends(capsys):
    from remoteops.laptop.remote_train_cli import _PlainFollower

    follow = _PlainFollower()
    data = {"stages": [], "base_model": {"status": "running", "line": "base model: fetching "
                                          "org/x, 1.0 MB of 2.0 MB (50%), 1.0 MB/s"}}
    follow(data, "")
    follow({**data, "base_model": {**data["base_model"], "line": "base model: fetching org/x, "
                                   "1.5 MB of 2.0 MB (75%), 1.0 MB/s"}}, "")
    follow({"stages": [], "base_model": {"status": "failed", "line": "base model: fetching "
                                         "org/x failed (just now): boom"}}, "")
    out = capsys.readouterr().out.splitlines()
    assert [l.split(" ", 1)[1] for l in out] == [
        "base model: fetching org/x, 1.0 MB of 2.0 MB (50%), 1.0 MB/s",
        "base model: fetching org/x failed (just now): boom"]
