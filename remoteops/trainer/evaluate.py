"""Stage evaluation: key-point coverage, format compliance, eval loss and perplexity.

The arithmetic is pure (``score_answer``, ``score_items``, ``compare_targets``);
``run_eval`` adds the model: it generates an answer per eval-set item with the
adapter, measures eval loss/perplexity of base and adapter on the references,
and writes ``eval_report_<stage>.json`` into the run directory.

Format rules are data, one object per rule in an item's ``format_rules``:
``{"rule": "sections", "value": ["思路", "结论"]}`` (headings at line starts),
``min_chars`` / ``max_chars`` (value: int), ``language`` (``zh`` or ``en``),
``list``, ``latex``, ``code_block``, ``contains`` / ``not_contains`` (value: str
or list), ``regex`` (value: pattern). Key points are strings, or lists of
alternatives (any one counts), matched after normalisation.
"""

from __future__ import annotations

import json
import math
import re
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable

from remoteops.common.errors import ConfigError

_PUNCT = set("，。、；：？！“”‘’（）《》【】「」,.;:?!\"'()[]<>*`#~|")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_LIST = re.compile(r"(?m)^\s*(?:[-*+•]\s+|\d+[.)、]\s*|[（(]\d+[)）]\s*)")
_LATEX = re.compile(r"\$[^$\n]+\$|\\\(|\\\[|\\begin\{|\\frac|\\[a-zA-Z]+\{")
RULES = ("sections", "min_chars", "max_chars", "language", "list", "latex", "code_block",
         "contains", "not_contains", "regex")


def normalise(text: str) -> str:
    """NFKC, case-folded, without whitespace and common punctuation."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return "".join(ch for ch in text if not ch.isspace() and ch not in _PUNCT)


def _alternatives(point: Any) -> list[str]:
    return [str(p) for p in point] if isinstance(point, (list, tuple)) else [str(point)]


def key_point_hit(answer: str, point: Any) -> bool:
    norm = normalise(answer)
    return any(normalise(alt) and normalise(alt) in norm for alt in _alternatives(point))


def _values(rule: dict) -> list[str]:
    value = rule.get("value")
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def check_rule(answer: str, rule: dict) -> bool:
    """Whether ``answer`` meets one format rule (ValueError for an unknown rule)."""
    kind = rule.get("rule")
    text = (answer or "").strip()
    if kind == "sections":
        return all(re.search(rf"(?m)^\s*(?:#+\s*)?(?:\*\*)?{re.escape(h)}", text)
                   for h in _values(rule))
    if kind == "min_chars":
        return len(text) >= int(rule["value"])
    if kind == "max_chars":
        return len(text) <= int(rule["value"])
    if kind == "language":
        cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
        letters = cjk + latin
        if rule.get("value") == "zh":
            return letters > 0 and cjk / letters >= 0.3
        if rule.get("value") == "en":
            return latin > 0 and cjk / letters < 0.1
        raise ValueError(f"language rule value {rule.get('value')!r}; use zh or en")
    if kind == "list":
        return bool(_LIST.search(text))
    if kind == "latex":
        return bool(_LATEX.search(text))
    if kind == "code_block":
        return text.count("```") >= 2
    if kind == "contains":
        return all(v in text for v in _values(rule))
    if kind == "not_contains":
        return not any(v in text for v in _values(rule))
    if kind == "regex":
        return bool(re.search(str(rule["value"]), text))
    raise ValueError(f"unknown format rule {kind!r}; use one of {', '.join(RULES)}")


def validate_items(items: list[dict], where: str) -> None:
    for i, item in enumerate(items, 1):
        for rule in item.get("format_rules") or []:
            if not isinstance(rule, dict) or rule.get("rule") not in RULES:
                raise ConfigError(f"{where} item {i}: bad format rule {rule!r}; use objects like "
                                  f"{{\"rule\": \"min_chars\", \"value\": 20}} with rule one of "
                                  f"{', '.join(RULES)}.")


def score_answer(answer: str, key_points: list, format_rules: list[dict]) -> dict[str, Any]:
    """Per-item result: which key points and format rules were met."""
    hit = [p for p in key_points if key_point_hit(answer, p)]
    missed = [p for p in key_points if not key_point_hit(answer, p)]
    passed = [r for r in format_rules if check_rule(answer, r)]
    failed = [r for r in format_rules if not check_rule(answer, r)]
    return {"key_points_hit": hit, "key_points_missed": missed,
            "rules_passed": passed, "rules_failed": failed,
            "coverage": len(hit) / len(key_points) if key_points else None,
            "format": len(passed) / len(format_rules) if format_rules else None}


def score_items(items: list[dict], answers: list[str]) -> dict[str, Any]:
    """Aggregate over items: coverage = key points hit / all key points; format = rules met / all rules."""
    results = [score_answer(a, it.get("key_points") or [], it.get("format_rules") or [])
               for it, a in zip(items, answers)]
    kp_total = sum(len(r["key_points_hit"]) + len(r["key_points_missed"]) for r in results)
    kp_hit = sum(len(r["key_points_hit"]) for r in results)
    fr_total = sum(len(r["rules_passed"]) + len(r["rules_failed"]) for r in results)
    fr_ok = sum(len(r["rules_passed"]) for r in results)
    return {"items": results, "key_points": kp_total, "key_points_hit": kp_hit,
            "rules": fr_total, "rules_passed": fr_ok,
            "coverage": kp_hit / kp_total if kp_total else None,
            "format": fr_ok / fr_total if fr_total else None}


def compare_targets(metrics: dict[str, Any], targets: dict[str, float]) -> dict[str, Any]:
    """``{"coverage": {"value", "target", "status"}, ...}``; status is pass or miss."""
    out = {}
    for name, target in targets.items():
        value = metrics.get(name)
        out[name] = {"value": value, "target": target,
                     "status": "pass" if value is not None and value >= target - 1e-12 else "miss"}
    return out


def evaluate_answers(items: list[dict], generate: Callable[[dict], str],
                     targets: dict[str, float]) -> dict[str, Any]:
    """Generate an answer per item with ``generate(item)`` and score them against targets."""
    answers = [generate(item) for item in items]
    scored = score_items(items, answers)
    for item, answer, result in zip(items, answers, scored["items"]):
        result["prompt"] = item.get("prompt")
        result["answer"] = answer
    scored["targets"] = compare_targets(scored, targets)
    scored["pass"] = all(t["status"] == "pass" for t in scored["targets"].values())
    return scored


# -- with a model ------------------------------------------------------------------
def mean_loss(model, examples: list[dict]) -> float | None:
    """Token-weighted mean loss of ``model`` over encoded examples (labels -100 ignored)."""
    import torch

    if not examples:
        return None
    total, count = 0.0, 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]], device=device)
            labels = torch.tensor([ex["labels"]], device=device)
            n = int((labels[:, 1:] != -100).sum())
            if n == 0:
                continue
            loss = model(input_ids=ids, labels=labels).loss
            total += float(loss) * n
            count += n
    return total / count if count else None


def _ppl(loss: float | None) -> float | None:
    return math.exp(min(loss, 50.0)) if loss is not None else None


def run_eval(cfg, run_dir: Path, adapter: Path | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate the stage's adapter (and its base) and write ``eval_report_<stage>.json``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from remoteops.common.clock import now_iso_precise
    from remoteops.common.files import write_atomic_text
    from remoteops.trainer.data import encode, read_jsonl, render
    from remoteops.trainer.train import load_tokenizer, quiet_transformers, say

    log = log or say
    quiet_transformers()
    if cfg.eval_set is None:
        raise ConfigError(f"stage '{cfg.name}' has no eval_set; add eval_set = "
                          f"\"data/eval/{cfg.name}.jsonl\" to [stages.{cfg.name}].")
    adapter = Path(adapter or cfg.adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"no adapter at {adapter}; train the stage first "
                          f"('remoteops-agent train --stage {cfg.name}').")
    started = time.time()
    data = read_jsonl(cfg.eval_set, cfg.train["max_bad_lines"], kind="eval", base=cfg.project_dir)
    items = [{"prompt": r.messages[-1]["content"], "messages": r.messages,
              "reference": r.extra.get("reference"), "key_points": r.extra.get("key_points") or [],
              "format_rules": r.extra.get("format_rules") or []} for r in data.records]
    validate_items(items, data.path)
    tok = load_tokenizer(cfg.base_model)
    encoded = []
    for it in items:
        if it["reference"]:
            try:
                encoded.append(encode(tok, it["messages"] + [{"role": "assistant",
                                                              "content": it["reference"]}],
                                      cfg.train["max_seq_len"]))
            except ValueError:
                pass
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(cfg.base_model), dtype=dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    base_loss = mean_loss(model, encoded)
    model = PeftModel.from_pretrained(model, str(adapter))
    adapter_loss = mean_loss(model, encoded)
    max_new = int(cfg.eval["max_new_tokens"])

    def generate(item: dict) -> str:
        prompt = render(tok, item["messages"], add_generation_prompt=True)
        enc = tok(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    scored = evaluate_answers(items, generate, cfg.targets)
    metrics = {"coverage": scored["coverage"], "format": scored["format"],
               "eval_loss": adapter_loss, "perplexity": _ppl(adapter_loss),
               "base_eval_loss": base_loss, "base_perplexity": _ppl(base_loss)}
    report = {"stage": cfg.name, "time": now_iso_precise(),
              "duration_s": round(time.time() - started, 2), "adapter": str(adapter),
              "base_model": str(cfg.base_model), "eval_set": data.path,
              "metrics": metrics, "targets": scored["targets"], "pass": scored["pass"],
              "counts": {k: scored[k] for k in ("key_points", "key_points_hit", "rules",
                                                 "rules_passed")},
              "items": scored["items"]}
    path = Path(run_dir) / f"eval_report_{cfg.name}.json"
    write_atomic_text(path, json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    fmt = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    for name, t in scored["targets"].items():
        log(f"{cfg.name} {name}: {fmt(t['value'])} (target {t['target']:.0%}): {t['status']}")
    log(f"{cfg.name} eval_loss base {base_loss if base_loss is None else round(base_loss, 4)} -> "
        f"adapter {adapter_loss if adapter_loss is None else round(adapter_loss, 4)}; "
        f"report {path}")
    return report
