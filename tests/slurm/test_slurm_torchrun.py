"""torchrun inside a Slurm job: the built-in trainer on 2 CPU ranks (gloo) in one batch job,
the first stage of a chain; its out-of-memory drill resubmits the chain with half the batch."""

from __future__ import annotations

import json

import pytest

from tests.executors.conftest import run_pipeline, stages_of

pytest.importorskip("torch")

DDP_IN_SLURM = """
[slurm]
poll_seconds = 0.3

[stages.ddp]
dataset = "data/train8.jsonl"
eval_set = "data/eval2.jsonl"
executor = "slurm"
nproc_per_node = 2

[stages.ddp.slurm]
cpus = 2

[stages.ddp.train]
batch_size = 4          # 4 rows per rank OOM (the drill); the retry runs 2 per rank
grad_accum = 1
inject_fault = "oom>2"

[stages.then]
command = "echo then"
executor = "slurm"
"""


def test_torchrun_inside_a_slurm_job_trains_on_two_ranks_and_an_oom_resubmits_the_chain(
        slurm, make_project):
    root = make_project(DDP_IN_SLURM)
    run, state = run_pipeline(root, "ddp,then", timeout=300)
    stages = stages_of(state)
    ddp, then = stages["ddp"], stages["then"]
    assert state["status"] == "done", (run / "logs" / "ddp.log").read_text()[-3000:]
    assert {k: ddp["executor"][k] for k in ("name", "nproc_per_node", "cpus")} == {
        "name": "slurm", "nproc_per_node": 2, "cpus": 2}
    assert [a["failure_class"] for a in ddp["attempts"]] == ["oom", None]
    assert ddp["attempts"][1]["overrides"] == {"batch_size": 2, "grad_accum": 2}
    first, second = (a["job"] for a in ddp["attempts"])
    assert slurm.states(first, second) == {first: "FAILED", second: "COMPLETED"}
    # the job behind the OOM was cancelled by Slurm and submitted again behind the retry
    jobs = [[(j["stage"], j["job"]) for j in c["jobs"]] for c in state["slurm_chains"]]
    assert [[s for s, _ in c] for c in jobs] == [["ddp", "then"], ["ddp", "then"]]
    assert slurm.states(jobs[0][1][1])[jobs[0][1][1]] == "CANCELLED"
    assert then["status"] == "done" and then["executor"]["job"] == jobs[1][1][1]
    log = (run / "logs" / "ddp.log").read_text()
    assert log.count("-m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2 -m "
                     "remoteops.agent train") == 4  # each job's header and its stage-job line
    assert "batch 2 x 2 ranks, grad accum 2" in log
    entry = json.loads((run / "summary.json").read_text())["stages"]["ddp"]
    assert entry["world_size"] == 2 and entry["final"]["step"] == 2
    assert (root / "outputs" / "adapter" / "adapter_ddp" / "adapter_model.safetensors").is_file()
    assert (run / "eval_report_ddp.json").is_file()  # evaluated inside the second job


@pytest.mark.parametrize("key", ["nnodes = 2", 'rdzv_endpoint = "h:29500"'])
def test_several_machine_torchrun_keys_on_a_slurm_stage_are_refused(make_project, key):
    from tests.executors.conftest import agent

    root = make_project(f'\n[stages.s]\ncommand = "python x.py"\nexecutor = "slurm"\n{key}\n')
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "s")
    name = key.split()[0]
    assert res.returncode != 0 and (res.stdout + res.stderr).strip().endswith(
        f"stages.s.{name} is a torchrun setting for several machines but a Slurm stage runs its "
        f"job on one node; keep nproc_per_node (torchrun inside the job) and remove {name}.")
