"""The final closure report: per stage training, eval, post-eval, issues, quantization, commands.

``build_closure`` gathers what the run directory holds (``summary.json``,
``eval_report_<stage>.json`` with its ``post_eval`` section,
``quant_<stage>.json``) into one dict; ``render_closure`` turns it into
Markdown. Pure Python: no torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from remoteops.common.clock import now_iso_precise
from remoteops.common.sizes import human_size

SECTIONS = ("Training outcome", "Eval metrics vs targets", "Post-eval fixes (before / after)",
            "Issue log", "Quantization", "Reproduce")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stages(run_dir: Path, summary: dict) -> list[str]:
    names = list((summary.get("stages") or {}).keys())
    for pattern in ("eval_report_*.json", "quant_*.json"):
        for path in sorted(run_dir.glob(pattern)):
            name = re.sub(r"^(eval_report|quant)_", "", path.stem)
            if name not in names:
                names.append(name)
    return names


def build_closure(run_dir: Path, settings=None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    summary = _read(run_dir / "summary.json") or {}
    project = Path(settings.project_dir) if settings is not None else None
    out: dict[str, Any] = {"run_dir": str(run_dir), "written": now_iso_precise(),
                           "project_dir": str(project) if project else None, "stages": {}}
    for stage in _stages(run_dir, summary):
        train = (summary.get("stages") or {}).get(stage)
        report = _read(run_dir / f"eval_report_{stage}.json")
        quant = _read(run_dir / f"quant_{stage}.json")
        post = (report or {}).get("post_eval")
        out["stages"][stage] = {
            "training": _training(train),
            "eval": {"metrics": report.get("metrics"), "targets": report.get("targets"),
                     "pass": report.get("pass")} if report else None,
            "post_eval": {k: post.get(k) for k in ("before", "after", "rule_changes",
                                                    "answers_changed")} if post else None,
            "issues": post.get("issues") if post else None,
            "quantization": _quant_rows(quant),
            "commands": _commands(stage, run_dir, train, project),
        }
    return out


def _training(entry: dict | None) -> dict | None:
    if not entry:
        return None
    cfg = entry.get("config") or {}
    return {"status": entry.get("status"), "reason": entry.get("reason") or None,
            "duration_s": entry.get("duration_s"), "samples": entry.get("samples"),
            "preset": cfg.get("preset"), "train_loss": entry.get("train_loss"),
            "final_loss": (entry.get("final") or {}).get("loss"),
            "best_eval_loss": (entry.get("best") or {}).get("eval_loss"),
            "base_eval_loss": entry.get("base_eval_loss"),
            "adapter_eval_loss": entry.get("adapter_eval_loss"), "adapter": entry.get("adapter")}


def _quant_rows(quant: dict | None) -> dict | None:
    if not quant:
        return None
    checks = {}
    for name, res in (quant.get("checks") or {}).items():
        rows = [{k: r.get(k) for k in ("type", "size_bytes", "ppl", "ppl_delta", "tokens_per_s",
                                       "verdict", "reason", "load", "token_parity", "logit_max_abs_diff",
                                       "top1_agreement", "memory_bytes", "device", "sample")}
                for r in res.get("rows") or []]
        checks[name] = {"verdict": res.get("verdict"), "reason": res.get("reason"),
                        "device": res.get("device"), "notes": res.get("notes") or [],
                        "reference": res.get("reference"), "rows": rows}
    return checks


def _commands(stage: str, run_dir: Path, train: dict | None, project: Path | None) -> list[str]:
    preset = ((train or {}).get("config") or {}).get("preset")
    rd = str(run_dir)
    return ([f"cd {project}"] if project else []) + [f"remoteops-agent train --stage {stage}"
            + (f" --preset {preset}" if preset else "") + f" --run-dir {rd}",
            f"remoteops-agent eval --stage {stage} --run-dir {rd}",
            f"remoteops-agent post-eval --stage {stage} --run-dir {rd}",
            f"remoteops-agent quant --stage {stage} --run-dir {rd}",
            f"remoteops-agent closure-report --run-dir {rd}"]


# -- Markdown ----------------------------------------------------------------------
def _pct(v, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.2%}" if signed else f"{v:.1%}"


def _num(v, digits: int = 4) -> str:
    return "n/a" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_closure(data: dict[str, Any]) -> str:
    lines = ["# Final closure report", "", f"Run directory: `{data['run_dir']}`  ",
             f"Written: {data['written']}", ""]
    if not data["stages"]:
        lines += ["No stage has results in this run directory yet.", ""]
    overview = ["| stage | training | eval | post-eval format | quantization |",
                "|---|---|---|---|---|"]
    for stage, s in data["stages"].items():
        t = (s["training"] or {}).get("status", "n/a")
        e = "pass" if (s["eval"] or {}).get("pass") else ("miss" if s["eval"] else "n/a")
        pe = s["post_eval"]
        pf = (f"{_pct(pe['before']['metrics']['format'])} -> {_pct(pe['after']['metrics']['format'])}"
              if pe else "n/a")
        q = ", ".join(f"{n}: {c['verdict']}" for n, c in (s["quantization"] or {}).items()) or "n/a"
        overview.append(f"| {stage} | {t} | {e} | {pf} | {_cell(q)} |")
    if data["stages"]:
        lines += ["## Overview", ""] + overview + [""]
    for stage, s in data["stages"].items():
        lines += [f"## Stage `{stage}`", ""]
        lines += _training_md(s["training"]) + _eval_md(s["eval"]) + _post_md(s["post_eval"])
        lines += _issues_md(s["issues"]) + _quant_md(s["quantization"])
        lines += ["### Reproduce", "", "```bash"] + s["commands"] + ["```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _training_md(t: dict | None) -> list[str]:
    out = ["### Training outcome", ""]
    if not t:
        return out + ["No training record for this stage in `summary.json`.", ""]
    status = t["status"] + (f" ({t['reason']})" if t.get("reason") else "")
    out += [f"- status: **{status}**, preset {t.get('preset') or 'n/a'}, "
            f"{_num(t.get('samples'))} samples, {_num(t.get('duration_s'), 3)} s",
            f"- loss: final {_num(t.get('final_loss'))}, train {_num(t.get('train_loss'))}; "
            f"eval loss base {_num(t.get('base_eval_loss'))} -> adapter "
            f"{_num(t.get('adapter_eval_loss'))} (best {_num(t.get('best_eval_loss'))})",
            f"- adapter: `{t.get('adapter') or 'n/a'}`", ""]
    return out


def _eval_md(e: dict | None) -> list[str]:
    out = ["### Eval metrics vs targets", ""]
    if not e:
        return out + ["No eval report for this stage.", ""]
    out += ["| metric | value | target | status |", "|---|---|---|---|"]
    for name, t in (e.get("targets") or {}).items():
        out.append(f"| {name} | {_pct(t.get('value'))} | {_pct(t.get('target'))} | {t.get('status')} |")
    m = e.get("metrics") or {}
    out += ["", f"Eval loss {_num(m.get('eval_loss'))} (perplexity {_num(m.get('perplexity'))}); "
            f"base {_num(m.get('base_eval_loss'))} (perplexity {_num(m.get('base_perplexity'))}).", ""]
    return out


def _post_md(p: dict | None) -> list[str]:
    out = ["### Post-eval fixes (before / after)", ""]
    if not p:
        return out + ["Post-eval fixes did not run for this stage.", ""]
    out += ["| metric | before | after | target | status after |", "|---|---|---|---|---|"]
    for name in ("format", "coverage"):
        b = (p["before"]["targets"] or {}).get(name) or {"value": p["before"]["metrics"].get(name)}
        a = (p["after"]["targets"] or {}).get(name) or {"value": p["after"]["metrics"].get(name)}
        out.append(f"| {name} | {_pct(b.get('value'))} | {_pct(a.get('value'))} | "
                   f"{_pct(a.get('target'))} | {a.get('status', 'n/a')} |")
    out += ["", f"Answers changed: {p.get('answers_changed', 0)}. Changes per rule:", ""]
    out += [f"- `{rule}`: {n}" for rule, n in (p.get("rule_changes") or {}).items()] + [""]
    return out


def _issues_md(issues: dict | None) -> list[str]:
    out = ["### Issue log", ""]
    if not issues:
        return out + ["No issue log (post-eval fixes did not run).", ""]
    out += ["**Fixed by rules**", ""]
    fixed = issues.get("fixed_by_rules") or []
    out += [f"- {i['problem']} ({i['count']}x; fixed by {', '.join(i['fixed_by']) or 'n/a'}). "
            f"Example: {_cell((i.get('example') or {}).get('prompt'))}: "
            f"`{_cell((i.get('example') or {}).get('before'))}` -> "
            f"`{_cell((i.get('example') or {}).get('after'))}`" for i in fixed] or ["- none"]
    out += ["", "**Still open** (need data or training changes)", ""]
    still = issues.get("still_open") or []
    for i in still:
        ex = i.get("example") or {}
        extra = f" missed {ex['missed']}" if ex.get("missed") else ""
        out.append(f"- {i['problem']} ({i['count']}x): {i.get('needs')}. Example: "
                   f"{_cell(ex.get('prompt'))}{_cell(extra)}: `{_cell(ex.get('answer'))}`")
    return out + (["- none"] if not still else []) + [""]


def _quant_md(q: dict | None) -> list[str]:
    out = ["### Quantization", ""]
    if not q:
        return out + ["No quantization check ran for this stage.", ""]
    out += ["| check | type | size | ppl | ppl delta | tokens/s | verdict |",
            "|---|---|---|---|---|---|---|"]
    for name, c in q.items():
        if not c["rows"]:
            out.append(f"| {name} | - | - | - | - | - | {c['verdict']}: {_cell(c['reason'])} |")
        for r in c["rows"]:
            verdict = r.get("verdict") or "n/a"
            if verdict != "feasible" and r.get("reason"):
                verdict += f": {r['reason']}"
            out.append(f"| {name} | {r.get('type')} | {human_size(r.get('size_bytes'), 'iec')} | "
                       f"{_num(r.get('ppl'), 6)} | {_pct(r.get('ppl_delta'), signed=True)} | "
                       f"{_num(r.get('tokens_per_s'), 4)} | {_cell(verdict)} |")
    out += ["", "Size is the file size (GGUF) or the loaded model's memory footprint (bitsandbytes); "
            "ppl delta is against the unquantized merge on the stage's eval set; tokens/s is a "
            "short greedy generation, prompt included.", ""]
    for name, c in q.items():
        ref = c.get("reference") or {}
        out.append(f"- **{name}**: {c['verdict']} ({_cell(c['reason'])})"
                   + (f"; device {c['device']}" if c.get("device") else "")
                   + (f"; reference {ref.get('type')} ppl {_num(ref.get('ppl'), 6)}" if ref else ""))
        for r in c["rows"]:
            bits = [f"load {'ok' if r.get('load') else 'FAILED'}"] if "load" in r else []
            if r.get("token_parity") is not None:
                bits.append(f"token parity {'ok' if r['token_parity'] else 'FAILED'}")
            if r.get("logit_max_abs_diff") is not None:
                bits.append(f"logit max abs diff {r['logit_max_abs_diff']:.2e}, top-1 agreement "
                            f"{_pct(r.get('top1_agreement'))}")
            if r.get("memory_bytes"):
                bits.append(f"memory {human_size(r['memory_bytes'], 'iec')}")
            if r.get("sample"):
                bits.append(f"sample `{_cell(r['sample'][:80])}`")
            if bits:
                out.append(f"  - {r.get('type')}: " + "; ".join(bits))
        out += [f"  - note: {_cell(n)}" for n in c.get("notes") or []]
    return out + [""]


# -- short sections for the run's other reports (the report_sections hook) ------------------
def quant_section(run_dir: str | Path, check: str) -> str | None:
    """A Markdown table of one check's rows over every stage of the run, or None."""
    lines = []
    for path in sorted(Path(run_dir).glob("quant_*.json")):
        res = ((_read(path) or {}).get("checks") or {}).get(check)
        if not res:
            continue
        stage = path.stem[len("quant_"):]
        if not res.get("rows"):
            lines.append(f"| {stage} | - | - | - | {res.get('verdict')}: {_cell(res.get('reason'))} |")
        for r in res.get("rows") or []:
            lines.append(f"| {stage} | {r.get('type')} | {human_size(r.get('size_bytes'), 'iec')} | "
                         f"{_pct(r.get('ppl_delta'), signed=True)} | {r.get('verdict')} |")
    if not lines:
        return None
    return "\n".join(["| stage | type | size | ppl delta | verdict |", "|---|---|---|---|---|"] + lines)


def post_eval_section(run_dir: str | Path) -> str | None:
    """Format and coverage before/after the post-eval fixes, per stage, or None."""
    lines = []
    for path in sorted(Path(run_dir).glob("eval_report_*.json")):
        post = (_read(path) or {}).get("post_eval")
        if not post:
            continue
        b, a = post["before"]["metrics"], post["after"]["metrics"]
        lines.append(f"| {path.stem[len('eval_report_'):]} | {_pct(b.get('format'))} -> "
                     f"{_pct(a.get('format'))} | {_pct(b.get('coverage'))} -> "
                     f"{_pct(a.get('coverage'))} | {post.get('answers_changed', 0)} |")
    if not lines:
        return None
    return "\n".join(["| stage | format | coverage | answers changed |", "|---|---|---|---|"] + lines)
