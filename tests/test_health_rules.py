"""The health_rules hook is called by both health watches: the built-in trainer's (before
each optimizer step, through the real agent `train` command) and the log watch of a
command stage (a real detached run on the local target). The rule comes from a plugin in
the project's plugins/ folder, as a user's would.
"""

from __future__ import annotations

import json
import time

from tests.reliability.test_pipeline_faults import OOM_TOML, stages, toml, train
from tests.harness.demo import DEMO, head_lines

RULE = '''
from remoteops import hookimpl


def _grad_watch(step, loss=None, grad_norm=None, lr=None):
    if step >= {step} and loss is not None:
        return "plugin_rule", f"step {{step}} reached the plugin's limit (loss {{loss:.3g}})"


@hookimpl
def health_rules(register):
    register(_grad_watch)
'''


def _plugin(project, step: int) -> None:
    (project / "plugins").mkdir(exist_ok=True)
    (project / "plugins" / "myrule.py").write_text(RULE.format(step=step))


def test_a_plugin_rule_stops_a_command_stage(cli, project):
    _plugin(project, 2)
    (project / "work.sh").write_text("echo loss=2.0; echo loss=1.5; echo loss=1.2; sleep 30\n")
    toml(project, '\n[stages.work]\ncommand = "bash work.sh"\n')
    started = time.monotonic()
    res = train(cli, project, "work")
    assert res.returncode != 0
    stage = stages(project)["work"]
    assert stage["status"] == "failed" and stage["failure_class"] == "plugin_rule", stage
    # line numbers of logs/work.log, after its blank line and the runner's ==> header
    assert "step 2 reached the plugin's limit (loss 1.5) (log line 4)" in stage["reason"]
    assert time.monotonic() - started < 25  # stopped at the rule, not after the sleep


def test_a_plugin_rule_stops_the_built_in_trainer_before_the_step(tiny_model,
                                                                  tmp_path):
    from tests.test_trainer import DRILL, agent, make_project

    project = make_project(tmp_path / "proj", tiny_model, DRILL)
    _plugin(project, 3)
    res = agent(project, "train", "--stage", "drill", "--run-dir", "outputs/training_sync/run_r")
    assert res.returncode == 1, res.stdout + res.stderr
    run = project / "outputs" / "training_sync" / "run_r"
    failed = json.loads((run / "drill.failed.json").read_text())
    assert failed["reason"] == "plugin_rule" and failed["step"] == 3, failed
    assert sorted(p.name for p in (run / "checkpoints" / "drill").iterdir()) == ["checkpoint-2"]
    assert not (project / "outputs" / "adapter" / "adapter_drill").exists()


def test_a_plugin_rule_fails_a_training_stage_of_a_run_without_a_retry(cli, project,
                                                                        tiny_model):
    _plugin(project, 1)
    head_lines(DEMO / "data" / "style.jsonl", project / "data" / "style.jsonl", 8)
    head_lines(DEMO / "data" / "eval" / "style.jsonl", project / "data" / "eval" / "style.jsonl", 2)
    toml(project, OOM_TOML.format(model=tiny_model).replace('inject_fault = "oom>2"', ""))
    res = train(cli, project, "Style", timeout=600)
    assert res.returncode != 0
    stage = stages(project)["Style"]
    assert stage["status"] == "failed" and stage["failure_class"] == "plugin_rule", stage
    assert stage["attempt"] == 1  # a rule's verdict is final, not a crash to resume from
