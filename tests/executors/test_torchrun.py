"""The torchrun executor for real: 2 processes on the CPU (gloo) under the detached runner."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.executors.conftest import run_pipeline, stages_of
from tests.harness.demo import adapter_weights

torch = pytest.importorskip("torch")

LR, STEPS = 2e-3, 2  # BASE: lr 2e-3; 8 samples at a global batch of 8 for 2 epochs

TWO_WAYS = """
[stages.ddp]
dataset = "data/train8.jsonl"
eval_set = "data/eval2.jsonl"
executor = "torchrun"
nproc_per_node = 2

[stages.ddp.train]
batch_size = 4          # 4 rows per rank OOM (the drill); the retry runs 2 per rank
grad_accum = 1
inject_fault = "oom>2"

[stages.one]
dataset = "data/train8.jsonl"
eval_set = "data/eval2.jsonl"

[stages.one.train]
batch_size = 4
grad_accum = 2
"""


def _train_rows(run: Path, stage: str) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["stage"] == stage and r["loss"]]


def _one_process_reference(root: Path) -> Path:
    """Stage ``one`` trained in this process, as the process executor would run it."""
    from remoteops.common.config import load_settings
    from remoteops.trainer.stageconf import resolve_stage
    from remoteops.trainer.train import run_train

    settings = load_settings(root, env={"REMOTEOPS_USER_CONFIG": str(root / "none.toml")})
    entry = run_train(resolve_stage(settings, "one"), root / "outputs" / "reference",
                      log=lambda message: None)
    assert entry["status"] == "done" and entry["world_size"] == 1
    return root / "outputs" / "reference"


def test_two_ranks_train_like_one_process_with_the_same_global_batch(make_project):
    root = make_project(TWO_WAYS)
    run, state = run_pipeline(root, "ddp")
    assert state["status"] == "done", (run / "runner.log").read_text()
    ddp = stages_of(state)["ddp"]
    assert ddp["executor"] == {"name": "torchrun", "nproc_per_node": 2, "nnodes": 1}

    # the first try ran out of memory on every rank; the retry halved the per-rank batch
    assert [a["failure_class"] for a in ddp["attempts"]] == ["oom", None]
    assert ddp["attempts"][1]["overrides"] == {"batch_size": 2, "grad_accum": 2}
    log = (run / "logs" / "ddp.log").read_text()
    assert "-m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2 -m " \
           "remoteops.agent train --stage ddp" in log
    assert "batch 2 x 2 ranks, grad accum 2" in log
    assert "distributed: 2 ranks over gloo" in log  # the backend the ranks agree over

    # rank 0 alone wrote the metrics and the summary; both ways took the same steps
    reference = _one_process_reference(root)
    assert [r["step"] for r in _train_rows(run, "ddp")] == ["1", "2"]
    for a, b in zip(_train_rows(run, "ddp"), _train_rows(reference, "one"), strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
    assert json.loads((run / "summary.json").read_text())["stages"]["ddp"]["world_size"] == 2
    assert "Executors: ddp: torchrun 2x1." in (run / "TRAINING_SUMMARY.md").read_text()

    # The adapters agree. Adam moves a weight by about lr per step at most, so lr x steps
    # bounds how far training moved any weight; the two runs differ only in the float32
    # order of the gradient all-reduce (which Adam can amplify where a gradient is near 0):
    # allow 1% of that bound. Training without the all-reduce (each rank alone, as the HF
    # Trainer silently did after an evaluate()) missed it 150 times over.
    tolerance = 0.01 * LR * STEPS
    a = adapter_weights(root / "outputs" / "adapter" / "adapter_ddp")
    b = adapter_weights(root / "outputs" / "adapter" / "adapter_one")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max(b[k].abs().max().item() for k in b if "lora_B" in k)  # lora_B starts at 0
    assert worst <= tolerance, (worst, tolerance)
    assert moved > 50 * tolerance  # the comparison is not vacuous


NAN_ON_RANK_1 = """
[stages.ddp]
dataset = "data/train8.jsonl"
eval_set = "data/eval2.jsonl"
executor = "torchrun"
nproc_per_node = 2

[stages.ddp.train]
batch_size = 2          # 2 steps an epoch: checkpoint-2 is saved before the NaN
grad_accum = 1
inject_fault = "nan@3:rank1"
"""


def test_nan_on_rank_1_stops_both_ranks_before_the_step_with_every_weight_finite(make_project):
    from safetensors.torch import load_file

    root = make_project(NAN_ON_RANK_1)
    run, state = run_pipeline(root, "ddp")
    stage = stages_of(state)["ddp"]
    assert state["status"] == "failed"
    assert stage["status"] == "failed" and stage["failure_class"] == "nan"
    assert len(stage["attempts"]) == 1  # NaN is not retried
    failed = json.loads((run / "ddp.failed.json").read_text())
    assert failed["reason"] == "nan" and failed["step"] == 3 and failed["rank"] == 0
    assert "rank 1" in failed["message"] or "ranks 0, 1" in failed["message"]
    ckpts = run / "checkpoints" / "ddp"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2"]  # nothing after
    files = list(ckpts.rglob("*.safetensors"))
    assert files and all(torch.isfinite(t).all() for f in files
                         for t in load_file(str(f)).values())
    assert not (root / "outputs" / "adapter" / "adapter_ddp").exists()
    assert max(int(r["step"]) for r in _train_rows(run, "ddp")) == 3
    log = (run / "logs" / "ddp.log").read_text()
    assert log.count("FAILED (nan) at step 3") == 1  # rank 0 speaks for the stage
    assert "remoteops/trainer" not in log  # stopped, not crashed (torchrun's own report
    # of a non-zero exit is a traceback of torch.distributed.run)


RANK_1_DIES = """
[stages.ddp]
dataset = "data/train8.jsonl"
executor = "torchrun"
nproc_per_node = 2

[stages.ddp.train]
batch_size = 2          # 2 steps an epoch: checkpoint-2, then rank 1 dies at step 3
grad_accum = 1
eval_holdout = 0.0
inject_fault = "kill@3:rank1"
"""


def test_a_rank_killed_mid_stage_is_resumed_from_the_checkpoint_under_torchrun(make_project):
    root = make_project(RANK_1_DIES)
    run, state = run_pipeline(root, "ddp")
    stage = stages_of(state)["ddp"]
    assert state["status"] == "done", (run / "logs" / "ddp.log").read_text()[-3000:]
    first, second = stage["attempts"]
    assert first["failure_class"] == "process_died" and not first["resume"]
    assert second["resume"] is True and second["failure_class"] is None
    log = (run / "logs" / "ddp.log").read_text()
    assert log.count("-m torch.distributed.run --standalone") == 2
    assert "--resume latest" in log.split("==> ")[-2]  # the retry ran with --resume latest
    assert f"resuming stage 'ddp' from {run}/checkpoints/ddp/checkpoint-2 (step 2)" in log
    entry = json.loads((run / "summary.json").read_text())["stages"]["ddp"]
    assert entry["status"] == "done" and entry["final"]["step"] == 4
    assert entry["resumed_from"].endswith("checkpoint-2") and entry["world_size"] == 2
    assert [r["step"] for r in _train_rows(run, "ddp")] == ["1", "2", "3", "4"]
    assert (root / "outputs" / "adapter" / "adapter_ddp" / "adapter_model.safetensors").is_file()
