"""Slurm ends, cancels and requeues: a failed stage leaves no job pending, a cancel is an
scancel, a job the cluster requeues is followed under its id, and bad [slurm] settings are
refused in one line. (A job killed by its time limit: ``test_slurm_pipeline``.)"""

from __future__ import annotations

import json
import time

import pytest

from tests.executors.conftest import agent, run_pipeline, stages_of
from tests.slurm.conftest import job_of, latest_run, run_pipeline_end, wait_for

FAILING = """
[slurm]
chain = "stage"          # one job at a time (the chain submitted up front: test_slurm_chain)

[stages.first]
command = "echo step 1 loss 2.0"
executor = "slurm"

[stages.broken]
command = "echo about to fail; exit 3"
executor = "slurm"

[stages.after]
command = "echo never ran > never.txt"
executor = "slurm"
"""


def test_stage_by_stage_a_failed_stage_leaves_no_successor_job_pending(slurm, make_project):
    root = make_project(FAILING)
    run, state = run_pipeline(root, "first,broken,after", timeout=120)
    stages = stages_of(state)
    broken, after = stages["broken"], stages["after"]
    assert state["status"] == "failed" and stages["first"]["status"] == "done"
    assert broken["status"] == "failed" and broken["failure_class"] == "process_died"
    assert broken["reason"] == "the command exited with 3"
    jobs = [a["job"] for a in broken["attempts"]]
    assert len(jobs) == 3 and len(set(jobs)) == 3  # max_retries 2: each retry a new job
    assert set(slurm.states(*jobs).values()) == {"FAILED"}
    assert after["status"] == "skipped" and "job" not in after["executor"]
    assert not (root / "never.txt").exists()
    assert slurm.run("squeue", "-h", "-t", "PENDING,RUNNING").stdout == ""  # nothing waits
    log = (run / "logs" / "broken.log").read_text()
    assert log.count("\nabout to fail\n") == 3
    first_job = stages["first"]["executor"]["job"]
    assert f"==> sbatch job {jobs[0]} after {first_job} (broken.1.sbatch)" in log


def test_cancel_scancels_the_running_job_and_the_run_shows_cancelled(slurm, make_project):
    root = make_project('\n[stages.long]\ncommand = "echo started; sleep 120"\n'
                        'executor = "slurm"\n')
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "long", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    job = wait_for(lambda: job_of(root, "long"), "job id in state.json")
    slurm.wait_state(job, {"RUNNING"})
    t0 = time.monotonic()
    res = agent(root, "pipeline-cancel", "--root", str(root))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith(": cancelled")
    assert time.monotonic() - t0 < 30
    assert slurm.states(job) == {job: "CANCELLED"}
    run = latest_run(root)
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "cancelled" and state["runner"].get("exited")
    long = stages_of(state)["long"]
    assert long["status"] == "cancelled" and long["failure_class"] == "cancelled"
    log = (run / "logs" / "long.log").read_text()
    assert "\nstarted\n" in log and f"==> stopped (cancelled): Slurm job {job} ended CANCELLED" in log


def test_a_job_the_cluster_requeues_is_followed_under_its_id(slurm, make_project, tmp_path):
    """``scontrol requeue`` stands in for a preemption with PreemptMode=REQUEUE; the stage is
    the first of a chain of two."""
    marker = tmp_path / "restarts"
    root = make_project(f'\n[stages.q]\ncommand = "echo restart=$SLURM_RESTART_COUNT | tee -a {marker}; '
                        f'[ -n \\"$SLURM_RESTART_COUNT\\" ] || sleep 60"\nexecutor = "slurm"\n'
                        '[stages.q.slurm]\npoll_seconds = 0.3\n'
                        '[stages.then]\ncommand = "echo then"\nexecutor = "slurm"\n')
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "q,then", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    job = wait_for(lambda: job_of(root, "q"), "job id")
    wait_for(lambda: marker.is_file(), "the job's first start")
    time.sleep(2)  # the runner has seen it running (it polls every 0.3 s)
    assert slurm.run("scontrol", "requeue", job).returncode == 0
    # Slurm holds a requeued job until its old credential expires (the harness: cred_expire=10)
    run, state = run_pipeline_end(root, 60)
    q = stages_of(state)["q"]
    assert state["status"] == "done" and len(q["attempts"]) == 1 and q["executor"]["job"] == job
    # in a chain: the job behind waited for the requeued one, under its first id
    then = stages_of(state)["then"]
    assert len(state["slurm_chains"]) == 1 and then["status"] == "done"
    assert state["slurm_chains"][0]["jobs"][1] == {"stage": "then", "job": then["executor"]["job"],
                                                   "after": job}
    assert marker.read_text().splitlines()[-1] == "restart=1"
    log = (run / "logs" / "q.log").read_text()
    assert f"==> Slurm job {job} was requeued (PENDING, " in log
    assert log.index("DUE TO JOB REQUEUE") < log.index("\nrestart=1\n")  # its second run


@pytest.mark.parametrize("extra,expected", [
    ('[stages.s.slurm]\ntime = "soon"',
     "'stages.s.slurm.time' is 'soon'; it must be sbatch --time text: MINUTES, H:MM:SS or "
     "DAYS-HOURS, e.g. \"4:00:00\""),
    ('[stages.s.slurm]\ngpus = 2', "unknown setting 'stages.s.slurm.gpus'. Did you mean 'cpus'?"),
    ('[stages.s.slurm]\nchain = "all"',
     "'stages.s.slurm.chain' is 'all'; it must be one of upfront, stage."),
    ('[stages.s.slurm]\nextra = ["qos=high"]',
     "stages.s.slurm.extra has 'qos=high'; each item is one sbatch option, e.g. \"--qos=high\"."),
])
def test_a_bad_slurm_setting_is_refused_in_one_line_before_anything_starts(
        make_project, extra, expected):
    root = make_project('\n[stages.s]\ncommand = "true"\nexecutor = "slurm"\n' + extra + "\n")
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "s")
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1 and expected in lines[0], lines
    assert not (root / "outputs").exists()


def test_slurm_settings_on_a_process_stage_are_refused(make_project):
    root = make_project('\n[stages.s]\ncommand = "true"\n[stages.s.slurm]\ncpus = 2\n')
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "s")
    assert res.returncode != 0 and (res.stdout + res.stderr).strip() == (
        "error: stages.s.slurm holds Slurm settings but the stage runs as a plain process; add "
        "executor = \"slurm\" to [stages.s] or remove [stages.s.slurm].")


def test_a_job_sbatch_refuses_fails_the_stage_as_a_config_error(slurm, make_project):
    root = make_project('\n[stages.s]\ncommand = "echo never"\nexecutor = "slurm"\n'
                        '[stages.s.slurm]\npartition = "nosuch"\n')
    run, state = run_pipeline(root, "s", timeout=60)
    stage = stages_of(state)["s"]
    assert state["status"] == "failed" and stage["failure_class"] == "config"
    assert stage["reason"] == ("stage s: sbatch refused the job: sbatch: error: Batch job "
                               "submission failed: Invalid partition name specified")
    assert len(stage["attempts"]) == 1  # a config error is not retried
