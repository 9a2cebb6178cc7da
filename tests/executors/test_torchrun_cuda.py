"""The torchrun executor on CUDA: what only a GPU machine can show. Every test here is
skipped without a CUDA device (``tests/bench/gpu_check.sh`` runs them on one); on the CPU
the same paths are covered by ``test_torchrun.py`` with gloo."""

from __future__ import annotations

import json

import pytest

from tests.executors.conftest import run_pipeline, stages_of

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STAGE = """
[stages.gpu]
dataset = "data/train8.jsonl"
eval_set = "data/eval2.jsonl"
executor = "torchrun"      # nproc_per_node left out: one rank per visible GPU

[stages.gpu.train]
batch_size = {batch}
grad_accum = 1
{fault}
"""


def gpu_stage(fault: str = "") -> str:
    """The stage with a per-rank batch that makes 2 optimizer steps per epoch (8 samples, a
    global batch of 4), so the NaN at step 3 comes after the first epoch's checkpoint."""
    gpus = torch.cuda.device_count()
    if 4 % gpus:
        pytest.skip(f"{gpus} GPUs do not split a global batch of 4")
    return STAGE.format(batch=4 // gpus, fault=fault)


def test_cuda_torchrun_takes_one_rank_per_visible_gpu_and_trains(make_project):
    root = make_project(gpu_stage())
    run, state = run_pipeline(root, "gpu", timeout=600)
    assert state["status"] == "done", (run / "runner.log").read_text()[-3000:]
    stage = stages_of(state)["gpu"]
    gpus = torch.cuda.device_count()
    assert stage["executor"] == {"name": "torchrun", "nproc_per_node": gpus, "nnodes": 1}
    summary = json.loads((run / "summary.json").read_text())["stages"]["gpu"]
    assert summary["world_size"] == gpus
    log = (run / "logs" / "gpu.log").read_text()
    assert f"--nproc_per_node {gpus} -m remoteops.agent train --stage gpu" in log
    if gpus > 1:  # the health verdict is agreed over NCCL, on CUDA tensors
        assert f"distributed: {gpus} ranks over nccl" in log, log[-3000:]
    assert (root / "outputs" / "adapter" / "adapter_gpu" / "adapter_model.safetensors").is_file()


def test_cuda_torchrun_nan_stops_before_the_step_with_every_saved_weight_finite(make_project):
    from safetensors.torch import load_file

    root = make_project(gpu_stage('inject_fault = "nan@3"'))
    run, state = run_pipeline(root, "gpu", timeout=600)
    stage = stages_of(state)["gpu"]
    assert stage["status"] == "failed" and stage["failure_class"] == "nan", stage
    failed = json.loads((run / "gpu.failed.json").read_text())
    assert failed["reason"] == "nan" and failed["step"] == 3
    kept = {p.name for p in (run / "checkpoints" / "gpu").glob("checkpoint-*")}
    assert kept == {"checkpoint-2"}, kept  # the first epoch's; step 3 was never applied
    files = list((run / "checkpoints" / "gpu").rglob("*.safetensors"))
    assert files and all(torch.isfinite(t).all() for f in files
                         for t in load_file(str(f)).values())
    assert not (root / "outputs" / "adapter" / "adapter_gpu").exists()


def test_cuda_qlora_under_torchrun_loads_4bit_on_the_ranks_gpu_and_trains(make_project):
    pytest.importorskip("bitsandbytes")
    root = make_project(gpu_stage('quantization = "qlora"'))
    run, state = run_pipeline(root, "gpu", timeout=600)
    assert state["status"] == "done", (run / "runner.log").read_text()[-3000:]
    summary = json.loads((run / "summary.json").read_text())["stages"]["gpu"]
    assert summary["qlora"] is True and summary["world_size"] == torch.cuda.device_count()
    assert (root / "outputs" / "adapter" / "adapter_gpu" / "adapter_model.safetensors").is_file()
