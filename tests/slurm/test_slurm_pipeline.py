"""The slurm executor on a real one-node cluster: a pipeline's stages as chained sbatch
jobs, followed by the runner, collected; status shows each stage's job."""

from __future__ import annotations

import json
import sys

from tests.conftest import ssh_alias, trust
from tests.executors.conftest import agent, run_pipeline, stages_of

PIPELINE = f"""
[slurm]
partition = "debug"
time = "10"
poll_seconds = 0.5

[stages.style]
dataset = "data/train8.jsonl"
eval_set = "data/eval2.jsonl"
executor = "slurm"

[stages.style.train]
batch_size = 4
grad_accum = 1

[stages.style.slurm]
cpus = 2
extra = ["--comment=remoteops-test"]

[stages.report]
command = "{sys.executable} -c 'import os; print(\\"step 1 loss 1.5\\"); print(os.environ[\\"SLURM_JOB_ID\\"], os.environ[\\"REMOTEOPS_STAGE\\"])'"
executor = "slurm"
"""


def test_a_pipeline_runs_as_chained_slurm_jobs_and_collects(slurm, make_project, cli, home,
                                                             sshd_server):
    root = make_project(PIPELINE)
    run, state = run_pipeline(root, "style,report", timeout=180)
    stages = stages_of(state)
    style, report = stages["style"], stages["report"]
    assert state["status"] == "done", (run / "logs" / "style.log").read_text()[-3000:]
    first, second = style["executor"]["job"], report["executor"]["job"]
    assert int(second) > int(first)
    assert style["executor"] == {"name": "slurm", "partition": "debug", "time": "10", "cpus": 2,
                                 "extra": ["--comment=remoteops-test"], "job": first}
    # each stage really ran as its Slurm job, the second chained after the first
    assert slurm.states(first, second) == {first: "COMPLETED", second: "COMPLETED"}
    script = (run / "slurm" / "style.1.sbatch").read_text()
    for line in ("#SBATCH --partition=debug", "#SBATCH --time=10", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --comment=remoteops-test", "#SBATCH --requeue"):
        assert line + "\n" in script
    log = (run / "logs" / "report.log").read_text()
    assert f"==> sbatch job {second} after {first} (report.1.sbatch)" in log
    assert f"\n{second} report\n" in log  # the job's own output, copied into the stage log
    assert "--dependency=afterok" not in script  # on sbatch's command line, see the log
    assert (root / "outputs" / "adapter" / "adapter_style" / "adapter_model.safetensors").is_file()
    assert (run / "eval_report_style.json").is_file()
    summary = (run / "TRAINING_SUMMARY.md").read_text()
    assert f"style: slurm job {first}" in summary and f"report: slurm job {second}" in summary
    # the laptop's status and collect over SSH, unchanged
    ssh_alias(home, "box", sshd_server)
    trust(root, sshd_server)
    env = {"REMOTEOPS_REMOTE_PYTHON": sys.executable, "TRAIN_SYNC_PROJECT_ROOT": str(root)}
    res = cli("status", "--host", "box", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in res.stdout.splitlines() if line.startswith("│")}
    assert rows["style"][3] == f"slurm job {first}" and rows["report"][3] == f"slurm job {second}"
    res = cli("collect", "--host", "box", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    print(res.stdout)
