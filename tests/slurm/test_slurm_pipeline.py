"""The slurm executor on a real one-node cluster: a pipeline's three stages submitted up front
as one chain of sbatch jobs, followed by the runner; its training job, killed by its time
limit, makes Slurm cancel the two jobs behind it, and the runner submits the rest of the
chain again, resuming from the checkpoint; status and collect over SSH read it as any run."""

from __future__ import annotations

import json
import sys

from remoteops.common.runs import executor_label
from tests.conftest import ssh_alias, trust
from tests.executors.conftest import agent, stages_of
from tests.slurm.conftest import job_of, latest_run, run_pipeline_end, wait_for

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
batch_size = 4          # 2 steps an epoch: checkpoint-2, then step 3 hangs
grad_accum = 1
inject_fault = "hang@3"

[stages.style.slurm]
cpus = 2
extra = ["--comment=remoteops-test"]

[stages.mid]
command = "echo mid ran in $SLURM_JOB_ID"
executor = "slurm"

[stages.report]
command = "{sys.executable} -c 'import os; print(\\"step 1 loss 1.5\\"); print(os.environ[\\"SLURM_JOB_ID\\"], os.environ[\\"REMOTEOPS_STAGE\\"])'"
executor = "slurm"
"""


def test_a_pipeline_runs_as_a_chain_submitted_up_front_and_a_time_limit_kill_resubmits_it(
        slurm, make_project, cli, home, sshd_server):
    """Slurm's shortest time limit is a minute: once the job hangs at step 3 the test moves its
    end time to now (``scontrol update EndTime=now``); Slurm's own time-limit check (every
    30 s) then kills it, as TIMEOUT."""
    root = make_project(PIPELINE)
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "style,mid,report", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    run = wait_for(lambda: latest_run(root), "run")
    log_path = run / "logs" / "style.log"

    def hung() -> bool:
        assert "exited" not in json.loads((run / "state.json").read_text())["runner"], \
            log_path.read_text()[-2000:]
        return log_path.is_file() and "hanging at step 3" in log_path.read_text()

    wait_for(hung, "hang at step 3", 150)
    timed_out = job_of(root, "style")
    # the whole chain is queued while its first job runs: one job per stage, afterok
    mid_1, report_1 = job_of(root, "mid"), job_of(root, "report")
    queue = slurm.run("squeue", "-h", "-j", f"{timed_out},{mid_1},{report_1}", "-o",
                      "%i|%T|%r").stdout.split()
    assert sorted(queue) == sorted([f"{timed_out}|RUNNING|None", f"{mid_1}|PENDING|Dependency",
                                    f"{report_1}|PENDING|Dependency"])
    assert slurm.run("scontrol", "update", f"JobId={timed_out}", "EndTime=now").returncode == 0
    run, state = run_pipeline_end(root, 300)  # a loaded 2-core machine: minutes
    stages = stages_of(state)
    style, mid, report = stages["style"], stages["mid"], stages["report"]
    assert state["status"] == "done", log_path.read_text()[-3000:]

    # the time limit: TIMEOUT, then a new job resumed from checkpoint-2
    first, second = style["attempts"]
    assert first["failure_class"] == "timeout" and first["job"] == timed_out
    assert first["reason"].startswith(f"Slurm job {timed_out} ended TIMEOUT")
    assert second["resume"] is True and second["job"] != timed_out
    log = log_path.read_text()
    assert "DUE TO TIME LIMIT" in log  # slurmstepd's own line, from the job's output file
    assert f"resuming stage 'style' from {run}/checkpoints/style/checkpoint-2 (step 2)" in log
    entry = json.loads((run / "summary.json").read_text())["stages"]["style"]
    assert entry["final"]["step"] == 4 and entry["resumed_from"].endswith("checkpoint-2")
    assert "attempt 1: timeout (Slurm job" in " ".join(style["warnings"])

    # the time limit made Slurm cancel the two jobs behind; the rest of the chain went again
    style_job, mid_job, report_job = (s["executor"]["job"] for s in (style, mid, report))
    assert [[(j["stage"], j["after"]) for j in c["jobs"]] for c in state["slurm_chains"]] == [
        [("style", None), ("mid", timed_out), ("report", mid_1)],
        [("style", None), ("mid", style_job), ("report", mid_job)]]
    assert slurm.states(timed_out, mid_1, report_1, style_job, mid_job, report_job) == {
        timed_out: "TIMEOUT", mid_1: "CANCELLED", report_1: "CANCELLED",
        style_job: "COMPLETED", mid_job: "COMPLETED", report_job: "COMPLETED"}
    assert style_job == second["job"] and int(report_job) > int(mid_job) > int(style_job)
    assert [a["job"] for a in mid["attempts"]] == [mid_job]  # the cancelled job never ran
    assert f"Slurm job {mid_1} ended CANCELLED (DependencyNeverSatisfied) when stage style " \
           "failed (timeout); submitted again behind it" in mid["warnings"]
    seen = {k: v for k, v in style["executor"].items() if k != "queued"}  # None once it ran
    assert seen == {"name": "slurm", "partition": "debug", "time": "10", "cpus": 2,
                    "extra": ["--comment=remoteops-test"], "job": style_job,
                    "after_training": "in the job", "chain": "upfront"}
    assert style["executor"].get("queued") is None
    script = (run / "slurm" / "style.1.sbatch").read_text()
    for line in ("#SBATCH --partition=debug", "#SBATCH --time=10", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --comment=remoteops-test", "#SBATCH --requeue"):
        assert line + "\n" in script
    report_log = (run / "logs" / "report.log").read_text()
    assert f"==> sbatch job {report_job} after {mid_job} (report.2.sbatch, chain)" in report_log
    assert f"==> sbatch job {report_1} after {mid_1} (report.1.sbatch, chain)" in report_log
    assert f"\n{report_job} report\n" in report_log  # the job's output, in the stage log
    assert (root / "outputs" / "adapter" / "adapter_style" / "adapter_model.safetensors").is_file()
    assert (run / "eval_report_style.json").is_file()
    # the evaluation ran at the end of the training job, on its node, not in the runner
    assert f"==> evaluation and after-stage plugins in job {style_job}\n" in log
    out = (run / "slurm" / "style.2.out").read_text()  # the job's own output file
    assert log.count(" -m remoteops.agent eval --stage style") == 1
    assert " -m remoteops.agent eval --stage style" in out.split("plugins in job")[1]
    summary = (run / "TRAINING_SUMMARY.md").read_text()
    assert f"style: slurm job {style_job}" in summary and f"report: slurm job {report_job}" in summary
    assert f"mid: slurm job {mid_job}" in summary

    # the laptop's status and collect over SSH, unchanged
    ssh_alias(home, "box", sshd_server)
    trust(root, sshd_server)
    env = {"REMOTEOPS_REMOTE_PYTHON": sys.executable, "TRAIN_SYNC_PROJECT_ROOT": str(root)}
    res = cli("status", "--host", "box", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in res.stdout.splitlines() if line.startswith("│")}
    assert rows["style"][3] == f"slurm job {style_job}"
    assert rows["mid"][3] == f"slurm job {mid_job}"
    assert rows["report"][3] == f"slurm job {report_job}"
    res = cli("collect", "--host", "box", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "TRAINING_SUMMARY.md" in res.stdout


def test_status_shows_a_queued_job_and_why_it_waits(slurm, make_project):
    root = make_project('\n[stages.held]\ncommand = "echo ran"\nexecutor = "slurm"\n'
                        '[stages.held.slurm]\nextra = ["--hold"]\n')
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "held", "--json")
    assert res.returncode == 0, res.stdout + res.stderr

    def queued():
        run = latest_run(root)
        if run is None or not (run / "state.json").is_file():
            return None
        return stages_of(json.loads((run / "state.json").read_text()))["held"].get(
            "executor", {}).get("queued")

    wait_for(lambda: queued() == "JobHeldUser", "JobHeldUser")
    run = latest_run(root)
    held = stages_of(json.loads((run / "state.json").read_text()))["held"]
    job = held["executor"]["job"]
    assert executor_label(held["executor"]) == f"slurm job {job}, queued (JobHeldUser)"
    assert slurm.run("scontrol", "release", job).returncode == 0
    run, state = run_pipeline_end(root, 60)
    held = stages_of(state)["held"]
    assert held["status"] == "done" and held["executor"]["queued"] is None
    assert executor_label(held["executor"]) == f"slurm job {job}"
