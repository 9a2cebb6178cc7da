"""The report_sections hook is called by the product: plugins add sections to
TRAINING_SUMMARY.md, and a plugin that fails does not lose the report.

A real detached run of a command stage on the local target, with a plugin in the
project's plugins folder.
"""

from __future__ import annotations

from tests.reliability.test_pipeline_faults import runs, state, toml, train

PLUGIN = '''
from remoteops import hookimpl


@hookimpl
def report_sections(run_dir, summary):
    names = ", ".join(s["stage"] + "=" + s["status"] for s in summary["stages"])
    return [("Throughput by plugin", "stages seen: " + names)]
'''

BROKEN = '''
from remoteops import hookimpl


@hookimpl
def report_sections(run_dir):
    raise RuntimeError("plugin bug")
'''


def _summary(cli, project, plugin: str) -> str:
    (project / "plugins").mkdir(exist_ok=True)
    (project / "plugins" / "mysection.py").write_text(plugin)
    toml(project, '\n[stages.hello]\ncommand = "echo hello"\n')
    res = train(cli, project, "hello")
    assert res.returncode == 0, res.stderr
    assert state(project)["status"] == "done"
    return (runs(project)[-1] / "TRAINING_SUMMARY.md").read_text()


def test_a_plugin_section_lands_in_the_training_summary(cli, project):
    text = _summary(cli, project, PLUGIN)
    assert "## Throughput by plugin\n\nstages seen: hello=done" in text
    assert text.index("## Throughput by plugin") < text.index("## Reproduce")


def test_a_failing_section_plugin_is_named_and_the_summary_is_still_written(cli, project):
    text = _summary(cli, project, BROKEN)
    assert "## Plugin sections\n\ncould not be written: `RuntimeError: plugin bug`" in text
    assert "## Stages" in text and "| hello | done |" in text
