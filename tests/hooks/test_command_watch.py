"""What the runner does with a command stage's signals and output (real detached runs on the
local target): a failed signal written through the hooks stops the stage with its reason
even when the process goes on; the health window marks a stage healthy; a traceback the
process survives is a warning; a crash is classified when the process exits."""

from __future__ import annotations

import json
import sys
import time

from tests.reliability.test_pipeline_faults import runs, stages, toml, train

MARK_FAILED = ("from remoteops.hooks import TrainingHooks; import time; "
               "TrainingHooks().mark_failed('bad_batch', 'batch 7 has empty labels', step=7); "
               "print('still going', flush=True); time.sleep(30); print('never')")
SURVIVE = ("import logging, sys, time\\n"
           "try:\\n    {}['input_ids']\\nexcept KeyError:\\n    logging.exception('skipped a batch')\\n"
           "for i in range(1, 4):\\n    print(f'step {i} loss {2.0 - i / 10}', flush=True)\\n")
CRASH = "print('step 1 loss 2.0'); batch = {}; batch['input_ids']"


def test_a_failed_signal_from_the_hooks_stops_a_running_command_with_its_reason(cli, project):
    (project / "mark.py").write_text(MARK_FAILED.replace("; ", "\n"))
    toml(project, f'[stages.mine]\ncommand = "{sys.executable} mark.py"\n'
                  '[stages.after]\ncommand = "echo after"\n')
    started = time.monotonic()
    res = train(cli, project, "mine,after")
    assert res.returncode == 1, res.stdout + res.stderr
    assert time.monotonic() - started < 25  # stopped on the signal, not after the sleep
    st = stages(project)
    assert st["mine"]["failure_class"] == "bad_batch"
    assert st["mine"]["reason"] == "batch 7 has empty labels at step 7 (mine.failed)"
    assert st["mine"]["attempt"] == 1 and st["after"]["status"] == "skipped"
    log = (runs(project)[-1] / "logs" / "mine.log").read_text()
    assert "still going" in log and "never" not in log


def test_window_warning_and_crash_in_one_run(cli, project):
    (project / "survive.py").write_text(SURVIVE.replace("\\n", "\n"))
    (project / "crash.py").write_text(CRASH.replace("; ", "\n"))
    toml(project, f"""
[health]
window_seconds = 1.0

[stages.slow]
command = "sleep 2.5; echo slept"

[stages.survive]
command = "{sys.executable} survive.py"

[stages.crash]
command = "{sys.executable} crash.py"
""")
    res = train(cli, project, "slow,survive,crash")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "slow: healthy (health window passed (1 s without a failure))" in res.stdout
    st = stages(project)
    assert st["slow"]["status"] == "done" and st["slow"]["health"]["after_s"] >= 1.0
    run = runs(project)[-1]
    healthy = json.loads((run / "slow.healthy.json").read_text())
    assert healthy["reason"] == "health window passed (1 s without a failure)"
    # a handled exception's traceback: a warning, the stage is done
    assert st["survive"]["status"] == "done", st["survive"]
    assert [w for w in st["survive"]["warnings"] if "traceback" in w] == [
        "log line 4: a traceback while the process kept running: KeyError: 'input_ids'"]
    # a crash: classified as the process exits, with the exception's line
    crash = st["crash"]
    assert (crash["status"], crash["failure_class"]) == ("failed", "traceback")
    assert crash["reason"].startswith("KeyError: 'input_ids' (log line ")
    summary = (run / "TRAINING_SUMMARY.md").read_text()
    assert "- survive: log line 4: a traceback while the process kept running" in summary
