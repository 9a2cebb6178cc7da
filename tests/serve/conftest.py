"""A served project on the "server" side, built once: the tiny demo model, a LoRA adapter made
directly with peft (random, non-zero weights, so it changes the answers), its GGUF q4_k_m made
with llama.cpp's own converter and quantizer, and a finished run that names the stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

STAGE = """
[stages.tiny]
dataset = "data/sample.jsonl"
eval_set = "data/eval/style.jsonl"
"""


def make_adapter(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import torch

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(str(out))
    return out


def make_gguf(base: Path, adapter: Path, out_dir: Path, quant: str = "q4_k_m") -> Path:
    """Merge, convert to f16 and quantize, as the GGUF check does (the converter is cached)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from remoteops.quant.gguf_tools import convert, find_converter, quantize

    merged = out_dir / "merged"
    model = AutoModelForCausalLM.from_pretrained(str(base))
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(merged)
    conv = find_converter({}, lambda m: None)
    f16 = out_dir / "model-f16.gguf"
    convert(merged, f16, "f16", conv["dir"], "qwen2", lambda m: None)
    path = out_dir / f"model-{quant}.gguf"
    quantize(f16, path, quant)
    f16.unlink()
    return path


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
def served_root(tmp_path_factory) -> Path:
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
    (root / "outputs" / "quant" / "tiny" / "gguf" / "merged").exists() and \
        __import__("shutil").rmtree(root / "outputs" / "quant" / "tiny" / "gguf" / "merged")
    json.dumps({})  # keep the import used
    return root
