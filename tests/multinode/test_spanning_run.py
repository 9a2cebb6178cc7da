"""One training run across two "machines" (real sshd on 127.0.0.1 and 127.0.0.2): torchrun
with nnodes = 2, one CPU process (gloo) on each, started by remote-train --host @pair."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.harness.demo import adapter_weights
from tests.hosts.conftest import keyed
from tests.hosts.conftest import ENV
from tests.multinode.conftest import stages_of, state_of

torch = pytest.importorskip("torch")

LR, STEPS = 2e-3, 2  # TRAIN: lr 2e-3; 8 samples at a global batch of 8 for 2 epochs

SPAN = """
[stages.span]
dataset = "data/train8.jsonl"
eval_set = "data/eval2.jsonl"
executor = "torchrun"
nnodes = 2
nproc_per_node = 1

[stages.span.train]
batch_size = 4          # 4 rows on each node: a global batch of 8
grad_accum = 1

[stages.note]
command = "python -c \\"open('note.txt', 'w').write('ran here')\\""

[stages.one]
dataset = "data/train8.jsonl"
eval_set = "data/eval2.jsonl"

[stages.one.train]
batch_size = 4
grad_accum = 2
"""


def _one_process_reference(project: Path) -> dict:
    """Stage ``one`` (the same global batch in one process), trained in this process."""
    from remoteops.common.config import load_settings
    from remoteops.trainer.stageconf import resolve_stage
    from remoteops.trainer.train import run_train

    settings = load_settings(project, env={"REMOTEOPS_USER_CONFIG": str(project / "none.toml")})
    entry = run_train(resolve_stage(settings, "one"), project / "reference",
                      log=lambda message: None)
    assert entry["status"] == "done" and entry["world_size"] == 1
    return adapter_weights(project / "outputs" / "adapter" / "adapter_one")


def test_one_run_spans_two_hosts_and_trains_like_one_process(cli, spanning_project, roots):
    project = spanning_project(["precheck", "span", "note", "collect"], SPAN)
    res = cli("remote-train", "--host", "@pair", "--yes", env=ENV, timeout=600)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "remote-train on 2 hosts, ONE run spanning them: span (torchrun 1 x 2 machines)" in out
    run_id = re.search(r"\[h1\] started (run_\w+) as node 0 of 2", out).group(1)
    assert f"[h2] started {run_id} as node 1 of 2" in out  # the same run id on both hosts
    port = int(re.search(r"rendezvous 127\.0\.0\.1:(\d+)", out).group(1))

    first, second = state_of(roots["h1"], run_id), state_of(roots["h2"], run_id)
    assert first["status"] == second["status"] == "done"
    assert (first["node"]["rank"], second["node"]["rank"]) == (0, 1)
    one, two = stages_of(first), stages_of(second)
    # node 0 ran everything; node 1 only its share of the spanning stage
    assert [one[s]["status"] for s in ("precheck", "span", "note", "collect")] == ["done"] * 4
    assert {s: two[s]["status"] for s in ("precheck", "note", "collect")} == {
        s: "skipped" for s in ("precheck", "note", "collect")}
    assert two["note"]["reason"] == "runs on node 0 (h1)" and two["span"]["status"] == "done"
    assert (roots["h1"] / "note.txt").is_file() and not (roots["h2"] / "note.txt").exists()
    for rank, stage in ((0, one["span"]), (1, two["span"])):
        assert stage["executor"] == {"name": "torchrun", "nproc_per_node": 1, "nnodes": 2,
                                     "node_rank": rank, "hosts": ["h1", "h2"],
                                     "rdzv_endpoint": f"127.0.0.1:{port}"}
    log2 = (roots["h2"] / "outputs" / "training_sync" / run_id / "logs" / "span.log").read_text()
    assert (f"-m torch.distributed.run --nnodes 2 --node_rank 1 --rdzv_backend static "
            f"--rdzv_endpoint 127.0.0.1:{port} --rdzv_id {run_id}-span") in log2
    # each node keeps its own checkpoints (no shared filesystem); node 0 alone the adapter
    for host in ("h1", "h2"):
        ckpts = roots[host] / "outputs" / "training_sync" / run_id / "checkpoints" / "span"
        assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert not (roots["h2"] / "outputs" / "adapter").exists()
    # evaluation ran once, on node 0
    assert one["span"]["outputs"]["eval_report"] == "eval_report_span.json"
    assert "eval_report" not in two["span"]["outputs"]
    assert not (roots["h2"] / "outputs" / "training_sync" / run_id / "eval_report_span.json"
                ).exists()

    # collected from the first host into the one-host layout
    local = project / "outputs" / "training_sync" / run_id
    assert "torchrun 1x2" in (local / "TRAINING_SUMMARY.md").read_text()
    adapter = project / "outputs" / "adapter" / "adapter_span"
    assert adapter.joinpath("adapter_model.safetensors").read_bytes() == (
        roots["h1"] / "outputs" / "adapter" / "adapter_span" / "adapter_model.safetensors"
    ).read_bytes()
    assert not (project / "outputs" / "h1").exists()

    # Data-parallel across the two nodes equals one process with the same global batch:
    # Adam moves a weight by about lr per step, so lr x steps bounds how far training moved
    # any weight; the runs differ only in the float order of the gloo all-reduce (which Adam
    # can amplify where a gradient is near 0): allow 1% of that bound.
    tolerance = 0.01 * LR * STEPS
    a, b = adapter_weights(adapter), _one_process_reference(project)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max(b[k].abs().max().item() for k in b if "lora_B" in k)  # lora_B starts at 0
    assert worst <= tolerance, (worst, tolerance)
    assert moved > 50 * tolerance  # the comparison is not vacuous

    # status: each host's part, and the node layout
    status = keyed(cli("status", "--host", "@pair", "--json", env=ENV).stdout)
    assert {h: status[h]["result"]["run_id"] for h in ("h1", "h2")} == {"h1": run_id,
                                                                     "h2": run_id}
    table = cli("status", "--host", "h1,h2", env=ENV).stdout
    assert f"{run_id} (node 0 of 2)" in table.replace("\n", "") or "node 0 of 2" in table
    single = cli("status", "--host", "h2", env=ENV).stdout
    assert "torchrun 1x2, node 1 (h2) of 2" in single

    # collect over the spanning run: node 0's results into outputs/, node 1 says where they are
    again = cli("collect", "--host", "@pair", env=ENV)
    assert again.returncode == 0, again.stderr
    assert "collected 0 file(s)" in again.stdout
    assert ("node 1 of a run spanning h1,h2: its results are collected from h1 (node 0)"
            in again.stdout)
    assert not (project / "outputs" / "h1").exists() and not (project / "outputs" / "h2").exists()
    part = cli("collect", "--host", "h2", env=ENV)  # node 1's own part, asked for by name
    assert part.returncode == 0, part.stderr
    assert (project / "outputs" / "h2" / "training_sync" / run_id / "logs" / "span.log").is_file()
    assert stages_of(state_of(roots["h2"], run_id))["collect"]["status"] == "skipped"
