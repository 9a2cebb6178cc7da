"""Post-eval fixes: configured rules lift a crafted answer set's format compliance over target."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from remoteops.common.config import load_settings
from remoteops.plugins import PluginManager, builtin_dir, load_file
from remoteops.trainer.demo_model import copy_demo_project
from remoteops.trainer.evaluate import compare_targets, score_items

ZH = [{"rule": "sections", "value": ["思路", "结论"]}, {"rule": "language", "value": "zh"},
      {"rule": "latex"}, {"rule": "max_chars", "value": 120},
      {"rule": "not_contains", "value": ["好的", "希望对你有帮助"]}]
CODE = [{"rule": "code_block"}, {"rule": "language", "value": "zh"},
        {"rule": "sections", "value": ["结论"]}, {"rule": "max_chars", "value": 200},
        {"rule": "not_contains", "value": ["Sure"]}]

# (prompt, answer, key points, format rules): each answer has a problem a rule can fix,
# except the last one, which is in English (training data must fix that).
CRAFTED = [
    ("点电荷的电势？",
     "好的，这是一个很好的问题！\n思路：从 $E$ 积分到无穷远。\n结论：$V=kq/r$。\n希望对你有帮助！",
     ["无穷远"], ZH),
    ("球面内的电场？", "思路：取高斯面，$\\oint E dA = 0$。\n球面内 E=0",
     ["高斯面"], ZH),
    ("电容的定义？", "思路：$C=Q/U$。\n思路：$C=Q/U$。\n思路：$C=Q/U$。\n思路：$C=Q/U$。\n"
     "思路：$C=Q/U$。\n思路：$C=Q/U$。\n思路：$C=Q/U$。\n思路：$C=Q/U$。\n结论：$C=Q/U$。",
     ["Q/U"], ZH),
    ("写一个计算电场的函数", "Sure! 下面是代码：\n```python\ndef field(q, r):\n    return q / r**2\n"
     "结论：电场与距离平方成反比", ["距离平方"], CODE),
    ("安培环路定理？",
     "## 思路\n### 推导 $\\oint B dl$\n#### 结论\n环路定理：$\\oint B\\cdot dl = \\mu_0 I$，"
     "适用于稳恒电流。", ["稳恒电流"], ZH),
    ("What is flux?", "思路: flux is the integral of $E$ over a surface.\n结论: it counts field lines.",
     ["通量"], ZH),
]


def crafted_report(targets=None) -> dict:
    items = [{"prompt": p, "key_points": k, "format_rules": r} for p, _, k, r in CRAFTED]
    answers = [a for _, a, _, _ in CRAFTED]
    scored = score_items(items, answers)
    for res, (p, a, _, _) in zip(scored["items"], CRAFTED):
        res["prompt"], res["answer"] = p, a
    targets = targets or {"coverage": 0.80, "format": 0.95}
    return {"stage": "style", "metrics": {"coverage": scored["coverage"], "format": scored["format"]},
            "targets": compare_targets(scored, targets), "pass": False, "items": scored["items"]}


def plugin_manager(*names: str) -> PluginManager:
    pm = PluginManager()
    for name in names:
        path = builtin_dir() / f"{name}.py"
        pm.register_module(load_file(path, name), name, "builtin", str(path), "test")
    pm.check_pending()
    return pm


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("REMOTEOPS_USER_CONFIG", str(tmp_path / "none.toml"))
    return copy_demo_project(tmp_path / "proj")


def test_rules_lift_format_compliance_over_target_with_counts_and_issue_log(project, tmp_path):
    from remoteops.server.postprocess import run_after_stage

    run = tmp_path / "run"
    run.mkdir()
    report = crafted_report()
    assert report["metrics"]["format"] < 0.95
    (run / "eval_report_style.json").write_text(json.dumps(report, ensure_ascii=False))
    settings = load_settings(project)
    record = run_after_stage(settings, "style", run, pm=plugin_manager("post_eval_fix"),
                             log=lambda m: None)
    assert record["post_eval"]["post_eval_fix"]["status"] == "done"
    assert (run / "postprocess_style.json").is_file()
    saved = json.loads((run / "eval_report_style.json").read_text())
    post = saved["post_eval"]
    before, after = post["before"]["metrics"]["format"], post["after"]["metrics"]["format"]
    assert before < 0.95 <= after
    assert post["before"]["targets"]["format"]["status"] == "miss"
    assert post["after"]["targets"]["format"]["status"] == "pass"
    # the measured evaluation is left as it was
    assert saved["metrics"] == report["metrics"] and saved["items"][0]["answer"] == CRAFTED[0][1]
    changes = {k.split(":", 1)[1]: v for k, v in post["rule_changes"].items()}
    assert changes["strip_boilerplate"] == 2
    assert changes["collapse_repeats"] == 1
    assert changes["close_code_fences"] == 1
    assert changes["normalise_headings"] == 1
    assert changes["final_section"] == 1
    fixed = {i["problem"] for i in post["issues"]["fixed_by_rules"]}
    assert "format rule 'not_contains: 好的/希望对你有帮助' failed" in fixed
    assert "format rule 'code_block' failed" in fixed
    still = post["issues"]["still_open"]
    lang = next(i for i in still if "language" in i["problem"])
    assert lang["example"]["prompt"] == "What is flux?" and "needs" in lang
    assert any(i["problem"].startswith("key points") for i in still)
    answers = {i["prompt"]: i["answer_fixed"] for i in post["items"]}
    assert answers["写一个计算电场的函数"].rstrip().endswith("```")
    assert not answers["点电荷的电势？"].startswith("好的")
    assert "结论：" in answers["球面内的电场？"]
    assert "## 推导" in answers["安培环路定理？"] and "#### " not in answers["安培环路定理？"]


def test_each_rule_alone():
    mod = load_file(builtin_dir() / "post_eval_fix.py", "post_eval_fix_alone")
    item = {"format_rules": [{"rule": "max_chars", "value": 30},
                             {"rule": "sections", "value": ["思路", "结论"]}]}
    assert mod.close_latex("能量 $E=mc^2", item, {}) == "能量 $E=mc^2$"
    assert mod.close_latex("$$a+b", item, {}) == "$$a+b$$"
    assert mod.close_latex("\\(x", item, {}) == "\\(x\\)"
    assert mod.close_latex("ok $x$ and $y$", item, {}) == "ok $x$ and $y$"
    long = "第一句话说完了。第二句话也说完了。第三句话很长很长很长很长很长很长很长很长很长。"
    assert mod.trim_length(long, item, {"max_chars": "auto"}) == "第一句话说完了。第二句话也说完了。"
    assert mod.trim_length(long, item, {"max_chars": 5}) == "第一句话说"
    assert mod.collapse_repeats("a\nb\na\nb", item, {"anywhere": True}) == "a\nb"
    assert mod.collapse_repeats("a\na\na\nb", item, {"max_repeats": 2}) == "a\na\nb"
    assert mod.final_section("思路：先算。\n所以 E=0。", item, {}).endswith("结论：所以 E=0")
    assert mod.final_section("x", item, {"heading": "Summary", "separator": ": ", "text": "y"}) \
        == "x\nSummary: y"
    assert mod.strip_boilerplate("Sure! The answer.\nHope this helps!", item, {}) == "The answer."
    with pytest.raises(ValueError, match="one of"):
        mod.configured_rules(_FakeSettings({"plugins.post_eval_fix.rules": [{"rule": "nope"}]}))


class _FakeSettings(dict):
    def get(self, key, default=None):
        return dict.get(self, key, default)


def test_disabled_or_other_stage_does_not_run_but_the_command_does(project, tmp_path):
    from remoteops.server.agent.quant_commands import register
    from remoteops.server.postprocess import run_after_stage

    run = tmp_path / "run"
    run.mkdir()
    (run / "eval_report_sample.json").write_text(json.dumps(crafted_report(), ensure_ascii=False))
    settings = load_settings(project)
    pm = plugin_manager("post_eval_fix")
    record = run_after_stage(settings, "sample", run, pm=pm, log=lambda m: None)
    assert record["post_eval"] == {} and record["quant"] == {}
    assert "post_eval" not in json.loads((run / "eval_report_sample.json").read_text())

    group = click.Group()
    register(group)
    import remoteops.server.postprocess as pp

    orig = pp._pm
    pp._pm = lambda s, p: pm  # the command loads plugins itself; give it ours
    try:
        result = CliRunner().invoke(group, ["post-eval", "--stage", "sample", "--run-dir", str(run),
                                            "--config", str(project / "remoteops.toml"), "--json"])
    finally:
        pp._pm = orig
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["post_eval_fix"]["after"]["metrics"]["format"] >= 0.95
    assert "post_eval" in json.loads((run / "eval_report_sample.json").read_text())
