"""A served project on the "server" side, built once: the tiny demo model, a LoRA adapter made
directly with peft (random, non-zero weights, so it changes the answers), its GGUF q4_k_m made
with llama.cpp's own converter and quantizer, and a finished run that names the stage."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.serve.models import make_adapter, make_gguf  # noqa: E402

STAGE = """
[stages.tiny]
dataset = "data/sample.jsonl"
eval_set = "data/eval/style.jsonl"
"""


def write_run(root: Path, run_id: str, stage: str) -> Path:
    from remoteops.common.runs import save_state

    run = root / "outputs" / "training_sync" / run_id
    run.mkdir(parents=True)
    entry = {"name": stage, "kind": "train", "status": "done", "attempt": 1, "attempts": [],
             "started": "2026-11-26T10:00:00Z", "ended": "2026-11-26T10:01:00Z",
             "duration_s": 60.0, "failure_class": None, "reason": None, "warnings": [],
             "outputs": {"adapter": f"outputs/adapter/adapter_{stage}"}}
    save_state(run, {"run_id": run_id, "run_dir": str(run), "project_root": str(root),
                     "created": "2026-11-26T10:00:00Z", "status": "done", "host": "box",
                     "bundle_version": None, "options": {}, "stages": [entry]})
    return run


@pytest.fixture(scope="session")
def served_root(tmp_path_factory):
    """The server's project root: demo model, adapter_tiny, its GGUF q4_k_m, a finished run."""
    from remoteops.trainer.demo_model import build_demo_model, copy_demo_project

    root = copy_demo_project(tmp_path_factory.mktemp("served") / "proj")
    with open(root / "remoteops.toml", "a", encoding="utf-8") as fh:
        fh.write(STAGE)
    base = build_demo_model(root / "outputs" / "demo-model", seed=0)
    adapter = make_adapter(base, root / "outputs" / "adapter" / "adapter_tiny")
    try:
        import llama_cpp  # noqa: F401

        make_gguf(base, adapter, root / "outputs" / "quant" / "tiny" / "gguf")
    except ImportError:
        pass  # the GGUF test skips (or fails under CI_REQUIRE_QUANT=1)
    write_run(root, "run_20261126T100000Z", "tiny")
    yield root
    stop_every_server(root)


def stop_every_server(root: Path) -> None:
    """What a failed test left served (its assertions come before its own --stop)."""
    import subprocess
    import sys

    if list((root / ".remoteops" / "serve").glob("*.json")):
        subprocess.run([sys.executable, "-m", "remoteops.agent", "serve-stop", "--root",
                        str(root)], capture_output=True, timeout=120)


@pytest.fixture(autouse=True)
def _nothing_left_served(request):
    yield
    if "served_root" in request.fixturenames:
        stop_every_server(request.getfixturevalue("served_root"))
