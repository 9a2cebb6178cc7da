"""Post-eval fixes: cheap, configured text rules applied to a stage's generated answers.

The rules are data in ``[plugins.post_eval_fix]`` (``rules = [...]``, each a
table with ``rule`` and its options; without ``rules`` the defaults below run).
The stage is re-scored with the trainer's own format scoring, and the eval
report gains a ``post_eval`` section: metrics before and after, per rule how
many answers it changed, and an issue log with two tracks: problems the rules
fixed and problems still open (which need data or training changes), each with
an example. The original answers and metrics are left as they were.

Rules (options in brackets):

* ``normalise_headings`` [``level`` = 2]: every Markdown heading gets that level.
* ``strip_boilerplate`` [``openings``, ``closings``: regex lists]: drops
  filler such as "好的，" / "Sure!" at the start and "希望对你有帮助" at the end.
* ``close_code_fences``: appends a closing ````` when the fences are unbalanced.
* ``close_latex``: closes an unbalanced ``$$``, ``$``, ``\\(`` or ``\\[``.
* ``collapse_repeats`` [``max_repeats`` = 1, ``anywhere`` = false]: removes
  repeated lines (consecutive, or anywhere in the answer).
* ``trim_length`` [``max_chars``: int or "auto" = the item's ``max_chars``
  format rule]: cuts at the last line or sentence end that fits.
* ``final_section`` [``heading``: text or "auto" = the last of the item's
  ``sections``; ``separator`` = "："; ``text``: fixed body, default the last
  sentence]: appends the required final section when it is missing.

Options shared by every rule: ``stages`` (list; default every stage).
"""

from __future__ import annotations

import copy
import re

from remoteops.api import hookimpl

__version__ = "0.1.0"

DEFAULT_RULES = [
    {"rule": "strip_boilerplate"},
    {"rule": "collapse_repeats"},
    {"rule": "close_code_fences"},
    {"rule": "close_latex"},
    {"rule": "normalise_headings", "level": 2},
    {"rule": "trim_length", "max_chars": "auto"},
    {"rule": "final_section", "heading": "auto"},
]

OPENINGS = [r"(好的|当然|没问题|嗯)[，,！!。.]?\s*", r"(Sure|Certainly|Of course|OK|Okay)[,!.]?\s+",
            r"(作为|As an?) (AI|人工智能)[^。.\n]*[。.]\s*", r"这是一个(很|非常)?好的问题[。！!]?\s*"]
CLOSINGS = [r"希望(这|以上|我的回答)?(对你|对您)?有(所)?帮助[。！!]?",
            r"如(果)?(还)?有(其他|任何)?(问题|疑问)[^\n]*",
            r"(I )?[Hh]ope (this|that) helps[.!]?", r"Let me know if [^\n]*"]
_SENTENCE_END = re.compile(r"[。！？!?.;；]\s*|\n")
_HEADING = re.compile(r"(?m)^(#{1,6})[ \t]+(?=\S)")


# -- the rules: (answer, item, options) -> answer ---------------------------------
def normalise_headings(text: str, item: dict, opts: dict) -> str:
    level = int(opts.get("level", 2))
    return _HEADING.sub("#" * level + " ", text)


def strip_boilerplate(text: str, item: dict, opts: dict) -> str:
    openings = [re.compile(p) for p in opts.get("openings", OPENINGS)]
    closings = [re.compile(rf"(?:{p})\s*$") for p in opts.get("closings", CLOSINGS)]
    changed = True
    while changed:  # filler can come in several pieces ("好的，当然，...")
        changed = False
        text = text.strip()
        for pat in openings:
            m = pat.match(text)
            if m and m.end() > 0 and text[m.end():].strip():
                text, changed = text[m.end():], True
        for pat in closings:
            m = pat.search(text)
            if m and text[:m.start()].strip():
                text, changed = text[:m.start()], True
    return text


def close_code_fences(text: str, item: dict, opts: dict) -> str:
    if text.count("```") % 2 == 1:
        return text.rstrip() + "\n```"
    return text


def close_latex(text: str, item: dict, opts: dict) -> str:
    body = re.sub(r"```.*?(```|$)", "", text, flags=re.S)  # code is not LaTeX
    suffix = ""
    if body.count("$$") % 2 == 1:
        suffix += "$$"
    singles = len(re.findall(r"(?<![\\$])\$(?!\$)", body))
    if singles % 2 == 1:
        suffix += "$"
    for opener, closer in ((r"\(", r"\)"), (r"\[", r"\]")):
        if body.count(opener) > body.count(closer):
            suffix += closer * (body.count(opener) - body.count(closer))
    return text.rstrip() + suffix if suffix else text


def collapse_repeats(text: str, item: dict, opts: dict) -> str:
    keep = max(1, int(opts.get("max_repeats", 1)))
    anywhere = bool(opts.get("anywhere", False))
    out: list[str] = []
    seen: dict[str, int] = {}
    run = 0
    for line in text.split("\n"):
        key = line.strip()
        if not key:
            out.append(line)
            run = 0
            continue
        if anywhere:
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > keep:
                continue
        else:
            prev = next((o.strip() for o in reversed(out) if o.strip()), None)
            run = run + 1 if prev == key else 1
            if run > keep:
                continue
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out))


def trim_length(text: str, item: dict, opts: dict) -> str:
    bound = opts.get("max_chars", "auto")
    if bound == "auto":
        bounds = [int(r["value"]) for r in item.get("format_rules", []) if r.get("rule") == "max_chars"]
        if not bounds:
            return text
        bound = min(bounds)
    bound = int(bound)
    text = text.strip()
    if len(text) <= bound:
        return text
    head = text[:bound]
    cuts = [m.end() for m in _SENTENCE_END.finditer(head)]
    cut = cuts[-1] if cuts and cuts[-1] >= bound // 2 else bound
    return close_latex(close_code_fences(head[:cut].rstrip(), item, {}), item, {})[:bound].rstrip()


def final_section(text: str, item: dict, opts: dict) -> str:
    heading = opts.get("heading", "auto")
    if heading == "auto":
        sections = [r["value"] for r in item.get("format_rules", []) if r.get("rule") == "sections"]
        if not sections:
            return text
        values = sections[-1] if isinstance(sections[-1], list) else [sections[-1]]
        heading = str(values[-1])
    if re.search(rf"(?m)^\s*(?:#+\s*)?(?:\*\*)?{re.escape(heading)}", text):
        return text
    body = opts.get("text")
    if body is None:
        parts = [p.strip() for p in _SENTENCE_END.split(text.strip()) if p.strip()]
        body = parts[-1] if parts else ""
    sep = opts.get("separator", "：")
    return f"{text.rstrip()}\n{heading}{sep}{body}".strip()


RULES = {f.__name__: f for f in (normalise_headings, strip_boilerplate, close_code_fences,
                                 close_latex, collapse_repeats, trim_length, final_section)}


# -- applying and re-scoring --------------------------------------------------------
def configured_rules(settings) -> list[dict]:
    rules = _opt(settings, "rules", None)
    rules = DEFAULT_RULES if rules is None else rules
    for i, rule in enumerate(rules, 1):
        if not isinstance(rule, dict) or rule.get("rule") not in RULES:
            raise ValueError(f"plugins.post_eval_fix.rules[{i}] is {rule!r}; each rule is a table "
                             f"with rule = one of {', '.join(RULES)}")
    return rules


def fix_answers(items: list[dict], answers: list[str], rules: list[dict], stage: str):
    """Apply ``rules`` in order; returns the fixed answers and per-rule change counts."""
    counts = {f"{i}:{r['rule']}": 0 for i, r in enumerate(rules, 1)}
    fixed, applied = [], []
    for item, answer in zip(items, answers):
        text, used = answer or "", []
        for i, rule in enumerate(rules, 1):
            if rule.get("stages") and stage not in rule["stages"]:
                continue
            new = RULES[rule["rule"]](text, item, rule)
            if new != text:
                counts[f"{i}:{rule['rule']}"] += 1
                used.append(rule["rule"])
                text = new
        fixed.append(text)
        applied.append(used)
    return fixed, counts, applied


def _rule_label(rule: dict) -> str:
    value = rule.get("value")
    if value is None:
        return str(rule.get("rule"))
    shown = "/".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return f"{rule.get('rule')}: {shown}"


def _excerpt(text: str, n: int = 160) -> str:
    text = (text or "").strip()
    return text if len(text) <= n else text[:n] + "…"


def issue_log(items, before, after, answers, fixed, applied) -> dict[str, list[dict]]:
    """Two tracks: format problems the rules fixed; problems still open, each with an example."""
    fixed_by: dict[str, dict] = {}
    still: dict[str, dict] = {}
    for item, b, a, old, new, used in zip(items, before, after, answers, fixed, applied):
        passed_after = [_rule_label(r) for r in a["rules_passed"]]
        for rule in b["rules_failed"]:
            label = _rule_label(rule)
            if label in passed_after:
                entry = fixed_by.setdefault(label, {"problem": f"format rule '{label}' failed",
                                                    "count": 0, "fixed_by": set(), "example": None})
                entry["count"] += 1
                entry["fixed_by"].update(used)
                entry["example"] = entry["example"] or {
                    "prompt": item.get("prompt"), "before": _excerpt(old), "after": _excerpt(new)}
        for rule in a["rules_failed"]:
            label = _rule_label(rule)
            entry = still.setdefault(f"format:{label}", {
                "problem": f"format rule '{label}' still fails",
                "needs": "training data that shows this format, or a new fix rule",
                "count": 0, "example": None})
            entry["count"] += 1
            entry["example"] = entry["example"] or {"prompt": item.get("prompt"),
                                                    "answer": _excerpt(new)}
        if a["key_points_missed"]:
            entry = still.setdefault("coverage", {
                "problem": "key points missing from the answer",
                "needs": "more or better training samples on these points (rules cannot add content)",
                "count": 0, "example": None})
            entry["count"] += len(a["key_points_missed"])
            entry["example"] = entry["example"] or {"prompt": item.get("prompt"),
                                                    "missed": a["key_points_missed"][:5],
                                                    "answer": _excerpt(new)}
    for entry in fixed_by.values():
        entry["fixed_by"] = sorted(entry["fixed_by"])
    return {"fixed_by_rules": list(fixed_by.values()), "still_open": list(still.values())}


def apply_fixes(stage: str, report: dict, rules: list[dict]) -> dict:
    """The ``post_eval`` section for ``report`` (its items hold the generated answers)."""
    from remoteops.api import compare_targets, score_items

    items = [{"prompt": it.get("prompt"),
              "key_points": list(it.get("key_points_hit", [])) + list(it.get("key_points_missed", [])),
              "format_rules": list(it.get("rules_passed", [])) + list(it.get("rules_failed", []))}
             for it in report.get("items", [])]
    answers = [it.get("answer") or "" for it in report.get("items", [])]
    targets = {k: v["target"] for k, v in (report.get("targets") or {}).items()}
    before = score_items(items, answers)
    fixed, counts, applied = fix_answers(items, answers, rules, stage)
    after = score_items(items, fixed)
    metrics = lambda s: {"coverage": s["coverage"], "format": s["format"]}  # noqa: E731
    return {
        "plugin": "post_eval_fix", "rules": copy.deepcopy(rules),
        "before": {"metrics": metrics(before), "targets": compare_targets(before, targets)},
        "after": {"metrics": metrics(after), "targets": compare_targets(after, targets)},
        "rule_changes": counts,
        "answers_changed": sum(1 for a, f in zip(answers, fixed) if a != f),
        "items": [{"prompt": it["prompt"], "answer_fixed": f, "rules_applied": u,
                   "format_before": b["format"], "format_after": a["format"]}
                  for it, f, u, b, a in zip(items, fixed, applied, before["items"], after["items"])],
        "issues": issue_log(items, before["items"], after["items"], answers, fixed, applied),
    }


def _opt(settings, key, default):
    getter = getattr(settings, "get", None)
    if getter is None:
        return default
    value = getter(f"plugins.post_eval_fix.{key}")
    return default if value is None else value


@hookimpl
def post_eval(stage, report, run_dir, settings):
    report["post_eval"] = apply_fixes(stage, report, configured_rules(settings))


@hookimpl
def report_sections(run_dir):
    from remoteops.api import post_eval_section

    table = post_eval_section(run_dir)
    return [("Post-eval fixes", table)] if table else None
