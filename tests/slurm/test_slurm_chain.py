"""The chain submitted up front (``[slurm] chain = "upfront"``, the default) on a real
one-node cluster: every job of consecutive Slurm stages exists before the first ends; a
stage that fails inside its job makes Slurm itself cancel the jobs behind it; ``cancel``
cancels all of them. (A time-limit kill resubmitting the rest: ``test_slurm_pipeline``.)"""

from __future__ import annotations

import json
import time

import pytest

from remoteops.common.runs import executor_label
from tests.executors.conftest import agent, stages_of
from tests.slurm.conftest import latest_run, run_pipeline_end, wait_for

CHAIN = """
[slurm]
poll_seconds = 0.3

[stages.first]
command = "echo first starts; sleep 4; echo step 1 loss 2.0"
executor = "slurm"

[stages.broken]
command = "echo about to fail; exit 3"
executor = "slurm"

[stages.after]
command = "echo never ran > never.txt"
executor = "slurm"
"""


def scontrol(slurm, job: str) -> dict[str, str]:
    out = slurm.run("scontrol", "-o", "show", "job", job).stdout
    return dict(word.split("=", 1) for word in out.split() if "=" in word)


def state_of(root) -> dict:
    run = latest_run(root)
    return json.loads((run / "state.json").read_text()) if run else {}


def test_a_failing_middle_stage_makes_slurm_cancel_the_job_behind_it(slurm, make_project):
    root = make_project(CHAIN)
    toml = root / "remoteops.toml"  # max_retries 1: the failed stage runs twice
    toml.write_text(toml.read_text().replace("[pipeline]\n", "[pipeline]\nmax_retries = 1\n"))
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "first,broken,after",
                "--json")
    assert res.returncode == 0, res.stdout + res.stderr

    # all three jobs exist while the first runs: the later two wait on their dependency
    def submitted():
        stages = stages_of(state_of(root)) if state_of(root) else {}
        jobs = [stages.get(n, {}).get("executor", {}).get("job") for n in ("first", "broken",
                                                                            "after")]
        return jobs if all(jobs) else None

    first, broken, after = wait_for(submitted, "three job ids in state.json", 30)
    slurm.wait_state(first, {"RUNNING"})
    queue = slurm.run("squeue", "-h", "-j", f"{first},{broken},{after}", "-o",
                      "%i|%T|%r").stdout.split()
    assert sorted(queue) == sorted([f"{first}|RUNNING|None", f"{broken}|PENDING|Dependency",
                                    f"{after}|PENDING|Dependency"])
    assert scontrol(slurm, after)["Dependency"].startswith(f"afterok:{broken}")

    def shows_dependency():
        stages = stages_of(state_of(root))
        return executor_label(stages["after"]["executor"]) == \
            f"slurm job {after}, queued (Dependency)"

    wait_for(shows_dependency, "status: queued (Dependency)", 10)

    run, state = run_pipeline_end(root, 90)
    stages = stages_of(state)
    assert state["status"] == "failed" and stages["first"]["status"] == "done"
    b, a = stages["broken"], stages["after"]
    assert b["status"] == "failed" and b["failure_class"] == "process_died"
    assert b["reason"] == "the command exited with 3"  # the verdict written inside the job
    b_jobs = [x["job"] for x in b["attempts"]]
    assert b_jobs[0] == broken and len(b_jobs) == 2  # max_retries 1: broken and after again
    # Slurm's own records: every job of "after" was cancelled by Slurm, none ran or waits
    a_jobs = [j["job"] for c in state["slurm_chains"] for j in c["jobs"] if j["stage"] == "after"]
    assert a_jobs[0] == after and len(a_jobs) == 2
    for job in a_jobs:
        info = scontrol(slurm, job)
        assert info["JobState"] == "CANCELLED" and info["Reason"] == "DependencyNeverSatisfied", info
        # it never ran: no run time, or no start at all. slurmctld once reported such a job's
        # RunTime as 20784-07:37:52 (now minus a start time of 0, shown as Unknown)
        assert info["RunTime"] == "00:00:00" or info.get("StartTime") in ("Unknown", "None"), \
            info
    assert set(slurm.states(*b_jobs).values()) == {"FAILED"}
    assert slurm.run("squeue", "-h", "-t", "PENDING,RUNNING").stdout == ""
    assert a["status"] == "skipped" and a["attempts"] == []
    assert a["reason"] == (f"stage broken failed (process_died); Slurm ended its job "
                           f"{a_jobs[1]} CANCELLED (DependencyNeverSatisfied)")
    assert f"Slurm job {after} ended CANCELLED (DependencyNeverSatisfied) when stage broken " \
           "failed (process_died); submitted again behind it" in a["warnings"]
    assert not (root / "never.txt").exists()
    # the chain as submitted, twice: the second from the failed stage on
    assert [[(j["stage"], j["after"]) for j in c["jobs"]] for c in state["slurm_chains"]] == [
        [("first", None), ("broken", first), ("after", broken)],
        [("broken", first), ("after", b_jobs[1])]]
    log = (run / "logs" / "broken.log").read_text()
    assert log.count("\nabout to fail\n") == 2
    assert f"==> sbatch job {broken} after {first} (broken.1.sbatch, chain)" in log
    assert f"==> stage broken failed in job {broken}: process_died: the command exited " \
           "with 3" in log
    summary = (run / "TRAINING_SUMMARY.md").read_text()
    assert f"first: slurm job {first}" in summary and f"broken: slurm job {b_jobs[1]}" in summary


def test_cancel_cancels_every_job_of_the_chain(slurm, make_project):
    root = make_project('\n[slurm]\npoll_seconds = 0.3\n'
                        '[stages.long]\ncommand = "echo started; sleep 120"\nexecutor = "slurm"\n'
                        '[stages.next]\ncommand = "echo next"\nexecutor = "slurm"\n'
                        '[stages.last]\ncommand = "echo last"\nexecutor = "slurm"\n')
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "long,next,last",
                "--json")
    assert res.returncode == 0, res.stdout + res.stderr

    def jobs():
        stages = stages_of(state_of(root)) if state_of(root) else {}
        found = [stages.get(n, {}).get("executor", {}).get("job") for n in ("long", "next",
                                                                             "last")]
        return found if all(found) else None

    ids = wait_for(jobs, "three job ids", 30)
    slurm.wait_state(ids[0], {"RUNNING"})
    t0 = time.monotonic()
    res = agent(root, "pipeline-cancel", "--root", str(root))
    assert res.returncode == 0, res.stdout + res.stderr
    assert time.monotonic() - t0 < 30
    assert slurm.states(*ids) == {job: "CANCELLED" for job in ids}
    assert slurm.run("squeue", "-h", "-t", "PENDING,RUNNING").stdout == ""
    state = state_of(root)
    assert state["status"] == "cancelled" and state["runner"].get("exited")
    assert [s["status"] for s in state["stages"] if s["name"] in ("long", "next", "last")] == [
        "cancelled"] * 3


HOOKS = '''import os
from pathlib import Path
from remoteops.api import hookimpl


def _record(what, stage, run_dir):
    with open(Path(run_dir) / "hooks.txt", "a") as fh:
        fh.write(f"{what} {stage} job={os.environ.get('SLURM_JOB_ID', 'none')}\\n")


@hookimpl
def before_stage(stage, run_dir):
    _record("before", stage, run_dir)


@hookimpl
def after_stage(stage, run_dir, status):
    _record(f"after:{status}", stage, run_dir)
'''


def test_a_stage_judged_failed_inside_its_job_stops_the_chain_though_it_exits_0(
        slurm, make_project):
    """A NaN in a command's log that then exits 0: the verdict, made inside the job, fails the
    job, so Slurm cancels the next one; the hooks ran in the jobs, not on the login node."""
    root = make_project('\n[slurm]\npoll_seconds = 0.3\n'
                        '[stages.ok]\ncommand = "echo step 1 loss 2.0"\nexecutor = "slurm"\n'
                        '[stages.nan]\ncommand = "echo step 1 loss 2.0; echo step 2 loss nan; '
                        'exit 0"\nexecutor = "slurm"\n'
                        '[stages.next]\ncommand = "touch ran.txt"\nexecutor = "slurm"\n')
    (root / "plugins").mkdir()
    (root / "plugins" / "record_hooks.py").write_text(HOOKS)
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "ok,nan,next", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    run, state = run_pipeline_end(root, 90)
    stages = stages_of(state)
    ok, nan, nxt = stages["ok"], stages["nan"], stages["next"]
    assert ok["status"] == "done" and nan["status"] == "failed"
    assert nan["failure_class"] == "nan" and len(nan["attempts"]) == 1  # policy: stop
    ok_job, nan_job, next_job = (s["executor"]["job"] for s in (ok, nan, nxt))
    assert scontrol(slurm, nan_job)["JobState"] == "FAILED"  # exit 0, judged failed in the job
    info = scontrol(slurm, next_job)
    assert info["JobState"] == "CANCELLED" and info["Reason"] == "DependencyNeverSatisfied"
    assert nxt["status"] == "skipped" and not (root / "ran.txt").exists()
    # before_stage in each job that ran, after_stage:done in the job of the stage that was
    # done, after_stage:failed by the runner on the login node (nothing waits on it)
    assert (run / "hooks.txt").read_text().splitlines() == [
        f"before ok job={ok_job}", f"after:done ok job={ok_job}",
        f"before nan job={nan_job}", "after:failed nan job=none"]


@pytest.mark.parametrize("chain", ["upfront", "stage"])
def test_a_resumed_run_cancels_the_jobs_its_dead_runner_left(slurm, make_project, chain):
    """The runner is killed (-9) while its jobs run; Slurm keeps them. Resuming the run cancels
    them before anything is submitted again, so no stage runs twice at once."""
    import os
    import signal

    from remoteops.common.runs import runner_alive

    root = make_project(f'\n[slurm]\npoll_seconds = 0.3\nchain = "{chain}"\n'
                        '[stages.long]\ncommand = "echo started; sleep 120"\nexecutor = "slurm"\n'
                        '[stages.next]\ncommand = "echo next"\nexecutor = "slurm"\n')
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "long,next", "--json")
    assert res.returncode == 0, res.stdout + res.stderr

    def long_jobs():
        stage = stages_of(state_of(root))["long"] if state_of(root) else {"attempts": []}
        return [a["job"] for a in stage["attempts"] if a.get("job")]

    old = wait_for(long_jobs, "the job of stage long running", 30)[0]
    old_ids = [old] + [j["job"] for c in state_of(root).get("slurm_chains", [])
                       for j in c["jobs"] if j["job"] != old]
    assert len(old_ids) == (2 if chain == "upfront" else 1)
    slurm.wait_state(old, {"RUNNING"})
    os.kill(state_of(root)["runner"]["pid"], signal.SIGKILL)  # the runner this test started
    wait_for(lambda: not runner_alive(state_of(root)), "the runner's death", 10)
    assert set(slurm.states(*old_ids).values()) <= {"RUNNING", "PENDING"}

    run = latest_run(root)
    res = agent(root, "pipeline-start", "--root", str(root), "--resume", run.name, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    new = wait_for(lambda: [j for j in long_jobs() if j not in old_ids], "a new job", 60)
    assert slurm.states(*old_ids) == {job: "CANCELLED" for job in old_ids}
    message = f"cancelled Slurm jobs {', '.join(old_ids)} left by this run's previous runner"
    if chain == "upfront":
        assert message in stages_of(state_of(root))["long"]["warnings"]
    else:
        assert f"==> {message}" in (run / "logs" / "long.log").read_text()
    res = agent(root, "pipeline-cancel", "--root", str(root))
    assert res.returncode == 0, res.stdout + res.stderr
    assert slurm.states(*new)[new[0]] == "CANCELLED"
    assert slurm.run("squeue", "-h", "-t", "PENDING,RUNNING").stdout == ""
