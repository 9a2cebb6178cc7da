"""After a training stage's eval: post-eval fix plugins, then quantization checks; the closure report.

Which plugins run after which stages is configuration, one table per plugin::

    [plugins.post_eval_fix]
    enabled = true
    stages = ["style", "writing", "all"]   # or ["*"] (the default): every stage

    [plugins.quant_gguf]
    enabled = true
    stages = ["all"]

A plugin without ``enabled = true`` does not run after stages; the agent's
``post-eval`` and ``quant`` commands run them on request (``explicit=True``)
whatever ``enabled`` and ``stages`` say. Failures of a plugin are recorded in
its result and never stop the pipeline.

Files in the run directory: ``eval_report_<stage>.json`` gains a
``post_eval`` section (original answers and metrics untouched);
``quant_<stage>.json`` holds every check's result; ``postprocess_<stage>.json``
records what ran; ``final_closure_report.md`` and ``.json`` sum it all up.
Large files (the merged model, removed afterwards unless ``keep_merged``; the
.gguf files) go to ``outputs/quant/<stage>/``, not into the run directory.

Shared quantization settings, ``[plugins.quant]``: ``out_dir``
("outputs/quant"), ``max_eval_items`` (8 eval items for perplexity),
``gen_tokens`` (32, for tokens/s), ``keep_merged`` (false).
"""

from __future__ import annotations

import copy
import json
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from remoteops.common.clock import now_iso_precise
from remoteops.common.files import write_atomic_json, write_atomic_text
from remoteops.common.errors import ConfigError
from remoteops.plugins import collect, each_plugin

POST_EVAL_HOOK = "post_eval"
QUANT_HOOK = "register_quant_checks"


def _write_json(path: Path, data: Any) -> None:
    write_atomic_json(path, data, indent=2, ensure_ascii=False, default=str)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def plugin_table(settings, name: str) -> dict:
    table = settings.get(f"plugins.{name}") if settings is not None else None
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"plugins.{name} must be a table, e.g. [plugins.{name}] enabled = true.")
    return dict(table or {})


def runs_after(settings, name: str, stage: str) -> bool:
    """Whether plugin ``name`` is configured to run after ``stage``."""
    table = plugin_table(settings, name)
    if not table.get("enabled", False):
        return False
    stages = table.get("stages", ["*"])
    stages = [stages] if isinstance(stages, str) else list(stages)
    return "*" in stages or stage in stages


def _pm(settings, pm):
    if pm is not None:
        return pm
    from remoteops.plugins import get_plugin_manager

    return get_plugin_manager(settings.project_dir, settings.get("plugins_dir", "plugins"))


def run_post_eval(settings, stage: str, run_dir: Path, pm=None, explicit: bool = False,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the configured ``post_eval`` plugins on ``eval_report_<stage>.json``; per plugin a status."""
    pm = _pm(settings, pm)
    path = Path(run_dir) / f"eval_report_{stage}.json"
    report = _read_json(path)
    results: dict[str, Any] = {}
    plugins = [(name, call) for name, call in each_plugin(pm, POST_EVAL_HOOK)
               if explicit or runs_after(settings, name, stage)]
    if not plugins:
        return results
    if report is None:
        for name, _call in plugins:
            results[name] = {"status": "skipped", "reason": f"no readable {path.name}; run eval first"}
        return results
    original = copy.deepcopy(report)
    for name, call in plugins:
        started = time.time()
        try:
            call(stage=stage, report=report, run_dir=str(run_dir), settings=settings)
            section = report.get("post_eval") or {}
            results[name] = {"status": "done", "duration_s": round(time.time() - started, 2),
                             "before": section.get("before"), "after": section.get("after")}
            after = (section.get("after") or {}).get("metrics", {})
            before = (section.get("before") or {}).get("metrics", {})
            log(f"{stage} post-eval {name}: format {_pct(before.get('format'))} -> "
                f"{_pct(after.get('format'))}, coverage {_pct(before.get('coverage'))} -> "
                f"{_pct(after.get('coverage'))}")
        except Exception as exc:  # a plugin's bug must not stop the pipeline
            results[name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()[-2000:]}
            log(f"{stage} post-eval {name} failed: {type(exc).__name__}: {exc}")
    # The evaluation itself stays as measured; plugins only add their sections.
    for key in ("items", "metrics", "targets", "pass"):
        if key in original:
            report[key] = original[key]
    _write_json(path, report)
    return results


def run_quant_checks(settings, stage: str, run_dir: Path, pm=None, only: str | None = None,
                     explicit: bool = False, log: Callable[[str], None] = print,
                     adapter: Path | None = None) -> dict[str, Any]:
    """Run the registered quantization checks for ``stage``; writes ``quant_<stage>.json``."""
    from remoteops.quant import NOT_FEASIBLE, QuantJob, SKIPPED

    pm = _pm(settings, pm)
    checks = []
    for entry in collect(pm, QUANT_HOOK, settings=settings):
        name, check = entry if isinstance(entry, tuple) else (getattr(entry, "name", "?"), entry)
        key = getattr(check, "settings_key", name)
        if only and only not in (name, key):
            continue
        if explicit or runs_after(settings, key, stage):
            checks.append((name, check))
    if only and not checks:
        raise ConfigError(f"no quantization check named '{only}' is loaded; see "
                          "'remoteops-agent plugins'.")
    if not checks:
        return {}
    job = QuantJob.for_stage(settings, stage, Path(run_dir), log=log, adapter=adapter)
    results: dict[str, Any] = {}
    problem = job.problem()
    for name, check in checks:
        started = time.time()
        if problem:
            res = {"check": name, "verdict": SKIPPED, "reason": problem, "rows": []}
        else:
            log(f"{stage} quant check {name}: running")
            try:
                res = check.run(job)
            except Exception as exc:
                res = {"check": name, "verdict": NOT_FEASIBLE, "rows": [],
                       "reason": f"the check crashed: {type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()[-2000:]}
        res["duration_s"] = round(time.time() - started, 2)
        results[name] = res
        log(f"{stage} quant check {name}: {res.get('verdict')} ({res.get('reason')})")
    job.cleanup()
    out = Path(run_dir) / f"quant_{stage}.json"
    previous = _read_json(out) or {}
    merged = {**previous.get("checks", {}), **results}
    _write_json(out, {"stage": stage, "time": now_iso_precise(), "adapter": str(job.adapter),
                      "base_model": str(job.base_model),
                      "eval_set": str(job.eval_set or job.live_dest),
                      "checks": merged})
    return results


def run_after_stage(settings, stage: str, run_dir: str | Path, pm=None, *, explicit: bool = False,
                    only: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Post-eval plugins then quantization checks configured for ``stage``; records what ran."""
    run_dir = Path(run_dir)
    pm = _pm(settings, pm)
    started = time.time()
    record: dict[str, Any] = {"stage": stage, "time": now_iso_precise()}
    try:
        record["post_eval"] = run_post_eval(settings, stage, run_dir, pm, explicit, log)
    except Exception as exc:  # recorded; the pipeline goes on
        record["post_eval"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"{stage} post-eval: {record['post_eval']['error']}")
    try:
        record["quant"] = {n: {"verdict": r.get("verdict"), "reason": r.get("reason")}
                           for n, r in run_quant_checks(settings, stage, run_dir, pm, only,
                                                        explicit, log).items()}
    except Exception as exc:  # recorded; the pipeline goes on
        record["quant"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"{stage} quant checks: {record['quant']['error']}")
    record["duration_s"] = round(time.time() - started, 2)
    _write_json(run_dir / f"postprocess_{stage}.json", record)
    return record


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def write_closure_report(run_dir: str | Path, settings=None) -> Path:
    """Write ``final_closure_report.md`` and ``.json`` into ``run_dir``; returns the .md path."""
    from remoteops.quant.closure import build_closure, render_closure

    run_dir = Path(run_dir)
    data = build_closure(run_dir, settings)
    _write_json(run_dir / "final_closure_report.json", data)
    path = run_dir / "final_closure_report.md"
    write_atomic_text(path, render_closure(data))
    return path
