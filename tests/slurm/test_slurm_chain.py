"""The chain submitted up front (``[slurm] chain = "upfront"``, the default) on a real
one-node cluster: every job of consecutive Slurm stages exists before the first ends; a
stage that fails inside its job makes Slurm itself cancel the jobs behind it; ``cancel``
cancels all of them. (A time-limit kill resubmitting the rest: ``test_slurm_pipeline``.)"""

from __future__ import annotations

import json
import time

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
        assert info["RunTime"] == "00:00:00"
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
