"""Slurm ends, cancels and requeues: a failed stage leaves no job pending, a cancel is an
scancel, a job killed by its time limit resumes from its checkpoint in a new job, a job the
cluster requeues is followed under its id, and bad [slurm] settings are refused in one line."""

from __future__ import annotations

import json
import time

import pytest

from tests.executors.conftest import agent, run_pipeline, stages_of

FAILING = """
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


def test_a_failed_stage_leaves_no_successor_job_pending(slurm, make_project):
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


def _wait_for(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout} s")


def _latest_run(root):
    runs = sorted((root / "outputs" / "training_sync").glob("run_*"))
    return runs[-1] if runs else None


def _job_of(root, stage: str):
    run = _latest_run(root)
    if run is None or not (run / "state.json").is_file():
        return None
    state = json.loads((run / "state.json").read_text())
    return stages_of(state)[stage].get("executor", {}).get("job")


def test_cancel_scancels_the_running_job_and_the_run_shows_cancelled(slurm, make_project):
    root = make_project('\n[stages.long]\ncommand = "echo started; sleep 120"\n'
                        'executor = "slurm"\n')
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "long", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    job = _wait_for(lambda: _job_of(root, "long"), "job id in state.json")
    slurm.wait_state(job, {"RUNNING"})
    t0 = time.monotonic()
    res = agent(root, "pipeline-cancel", "--root", str(root))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith(": cancelled")
    assert time.monotonic() - t0 < 30
    assert slurm.states(job) == {job: "CANCELLED"}
    run = _latest_run(root)
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "cancelled" and state["runner"].get("exited")
    long = stages_of(state)["long"]
    assert long["status"] == "cancelled" and long["failure_class"] == "cancelled"
    log = (run / "logs" / "long.log").read_text()
    assert "\nstarted\n" in log and f"==> stopped (cancelled): Slurm job {job} ended CANCELLED" in log


HANGS = """
[stages.slow]
dataset = "data/train8.jsonl"
executor = "slurm"

[stages.slow.slurm]
time = "10"

[stages.slow.train]
batch_size = 4          # 2 steps an epoch: checkpoint-2, then step 3 hangs
grad_accum = 1
eval_holdout = 0.0
inject_fault = "hang@3"
"""


def test_a_job_killed_by_its_time_limit_resumes_from_its_checkpoint_in_a_new_job(
        slurm, make_project):
    """Slurm's shortest limit is a minute: the test shortens the hung job's end time with
    ``scontrol update EndTime=now`` and Slurm's own time-limit check (every 30 s) kills it."""
    root = make_project(HANGS)
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "slow", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    run = _wait_for(lambda: _latest_run(root), "run")
    log_path = run / "logs" / "slow.log"

    def hung() -> bool:
        assert "exited" not in json.loads((run / "state.json").read_text())["runner"], \
            log_path.read_text()[-2000:]
        return log_path.is_file() and "hanging at step 3" in log_path.read_text()

    _wait_for(hung, "hang", 120)
    job = _job_of(root, "slow")
    assert slurm.run("scontrol", "update", f"JobId={job}", "EndTime=now").returncode == 0
    run, state = run_pipeline_end(root)
    slow = stages_of(state)["slow"]
    assert state["status"] == "done", log_path.read_text()[-3000:]
    first, second = slow["attempts"]
    assert first["failure_class"] == "timeout" and first["job"] == job
    assert first["reason"].startswith(f"Slurm job {job} ended TIMEOUT")
    assert second["resume"] is True and second["job"] != job
    assert slurm.states(job, second["job"]) == {job: "TIMEOUT", second["job"]: "COMPLETED"}
    log = log_path.read_text()
    assert f"resuming stage 'slow' from {run}/checkpoints/slow/checkpoint-2 (step 2)" in log
    assert "DUE TO TIME LIMIT" in log  # slurmstepd's own line, from the job's output file
    entry = json.loads((run / "summary.json").read_text())["stages"]["slow"]
    assert entry["final"]["step"] == 4 and entry["resumed_from"].endswith("checkpoint-2")
    assert "attempt 1: timeout (Slurm job" in " ".join(slow["warnings"])


def run_pipeline_end(root, timeout: float = 180):
    run = _latest_run(root)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads((run / "state.json").read_text())
        if state.get("runner", {}).get("exited"):
            return run, state
        time.sleep(0.5)
    raise AssertionError((run / "runner.log").read_text()[-2000:])


def test_a_job_the_cluster_requeues_is_followed_under_its_id(slurm, make_project, tmp_path):
    """``scontrol requeue`` stands in for a preemption with PreemptMode=REQUEUE."""
    marker = tmp_path / "restarts"
    root = make_project(f'\n[stages.q]\ncommand = "echo restart=$SLURM_RESTART_COUNT >> {marker}; '
                        f'[ -n \\"$SLURM_RESTART_COUNT\\" ] || sleep 60"\nexecutor = "slurm"\n')
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "q", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    job = _wait_for(lambda: _job_of(root, "q"), "job id")
    _wait_for(lambda: marker.is_file(), "the job's first start")
    assert slurm.run("scontrol", "requeue", job).returncode == 0
    run, state = run_pipeline_end(root, 60)
    q = stages_of(state)["q"]
    assert state["status"] == "done" and len(q["attempts"]) == 1 and q["executor"]["job"] == job
    assert marker.read_text() == "restart=\nrestart=1\n"
    assert f"==> Slurm job {job} was requeued and runs again (start 2)" in (
        run / "logs" / "q.log").read_text()


@pytest.mark.parametrize("extra,expected", [
    ('[stages.s.slurm]\ntime = "soon"',
     "'stages.s.slurm.time' is 'soon'; it must be sbatch --time text: MINUTES, H:MM:SS or "
     "DAYS-HOURS, e.g. \"4:00:00\""),
    ('[stages.s.slurm]\ngpus = 2', "unknown setting 'stages.s.slurm.gpus'. Did you mean 'cpus'?"),
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
