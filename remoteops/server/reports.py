"""Run reports: ``TRAINING_SUMMARY.md``, a loss-curve PNG per stage, ``run_summary.json``.

A person (or an assistant) reads these instead of a 10,000-line log. Built
from the run directory's files only (state.json, summary.json, metrics.csv,
eval reports), so the laptop can rebuild them after ``collect``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from remoteops.common.files import write_atomic_text
from remoteops.common.runs import executor_label


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def _metrics(run_dir: Path) -> dict[str, list[dict]]:
    path = run_dir / "metrics.csv"
    out: dict[str, list[dict]] = {}
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                out.setdefault(row.get("stage") or "", []).append(row)
    return out


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def plot_losses(run_dir: Path, stage: str, rows: list[dict]) -> Path | None:
    """``loss_<stage>.png``: training loss per step, eval loss per epoch."""
    train = [(_num(r["step"]), _num(r["loss"])) for r in rows if _num(r.get("loss")) is not None]
    evals = [(_num(r["step"]), _num(r["eval_loss"])) for r in rows
             if _num(r.get("eval_loss")) is not None]
    if not train and not evals:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
    from remoteops.server.live_report import mark_growth
    mark_growth(ax, rows)  # a live dataset: where the data grew
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"stage {stage}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / f"loss_{stage}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def stage_rows(run_dir: Path, state: dict, project_root: Path | None) -> list[dict]:
    summary = (_read_json(run_dir / "summary.json") or {}).get("stages", {})
    metrics = _metrics(run_dir)
    rows = []
    for stage in state["stages"]:
        name = stage["name"]
        trained = summary.get(name, {})
        losses = [_num(r["loss"]) for r in metrics.get(name, []) if _num(r.get("loss")) is not None]
        evals = [_num(r["eval_loss"]) for r in metrics.get(name, [])
                 if _num(r.get("eval_loss")) is not None]
        report = _read_json(run_dir / f"eval_report_{name}.json") or {}
        adapter = stage.get("outputs", {}).get("adapter")
        size = _dir_size(project_root / adapter) if adapter and project_root else 0
        rows.append({"stage": name, "kind": stage["kind"], "status": stage["status"],
                     "duration_s": stage.get("duration_s"), "attempts": stage.get("attempt", 0),
                     "failure_class": stage.get("failure_class"), "reason": stage.get("reason"),
                     "final_loss": losses[-1] if losses else None,
                     "best_eval_loss": min(evals) if evals else None,
                     "base_eval_loss": trained.get("base_eval_loss"),
                     "targets": report.get("targets") or {}, "eval_pass": report.get("pass"),
                     "adapter": adapter, "adapter_size": size,
                     "executor": stage.get("executor"),
                     "warnings": stage.get("warnings", [])})
    return rows


def plugin_sections(run_dir: Path, summary: dict, settings: Any, root: Path,
                    pm: Any = None) -> list[tuple[str, str]]:
    """``(title, markdown)`` sections from every ``report_sections`` implementation.

    A failing plugin is named in a section of its own instead: a report problem must not
    hide the run's outcome.
    """
    from remoteops.common.config import load_settings
    from remoteops.plugins import get_plugin_manager

    try:
        settings = settings if settings is not None else load_settings(root)
        pm = pm or get_plugin_manager(root, settings["plugins_dir"])
        found = pm.hook.report_sections(run_dir=str(run_dir), summary=summary, settings=settings)
    except Exception as exc:  # noqa: BLE001 - one plugin's bug must not lose the report
        return [("Plugin sections", f"could not be written: `{type(exc).__name__}: {exc}`")]
    return [(str(title), str(body)) for sections in found for title, body in sections or []]


def _cell(text: Any) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")[:300] or "-"


def chat_sections(run_dir: Path) -> list[str]:
    """Each ``chat_compare_<stage>.json`` (``invoke chat --compare base --report``) as a table."""
    lines: list[str] = []
    for path in sorted(run_dir.glob("chat_compare_*.json")):
        data = _read_json(path) or {}
        rows = data.get("rows") or []
        if not isinstance(rows, list) or not rows:
            continue
        lines += [f"## Chat: `{data.get('stage')}` adapter vs base", "",
                  f"The same prompts, answered greedily (at most {data.get('max_tokens')} tokens) "
                  f"by the served adapter and by the base model ({data.get('time')}).", "",
                  "| prompt | adapter | base |", "|---|---|---|"]
        lines += [f"| {_cell(r.get('prompt'))} | {_cell(r.get('adapter'))} | {_cell(r.get('base'))} |"
                  for r in rows if isinstance(r, dict)]
        lines.append("")
    return lines


def write_training_summary(run_dir: Path, settings: Any = None,
                           project_root: Path | None = None, pm: Any = None) -> Path:
    """Write TRAINING_SUMMARY.md, the loss PNGs and run_summary.json into ``run_dir``.

    Plugins add sections through the ``report_sections`` hook.
    """
    run_dir = Path(run_dir)
    state = _read_json(run_dir / "state.json")
    if state is None:
        raise FileNotFoundError(run_dir / "state.json")
    root = project_root or Path(state["project_root"])
    rows = stage_rows(run_dir, state, root)
    metrics = _metrics(run_dir)
    plots = {name: plot_losses(run_dir, name, r) for name, r in metrics.items() if name}
    lines = [f"# Training summary: {state['run_id']}", "",
             f"- status: **{state['status']}**",
             f"- host: {state.get('host') or '-'}; project root: `{state['project_root']}`",
             f"- bundle version: {('v' + str(state['bundle_version'])) if state.get('bundle_version') else 'not deployed by remoteops'}",
             f"- started: {state['created']}; finished: {state.get('finished') or '-'}", ""]
    failed = next((r for r in rows if r["status"] == "failed"), None)
    if failed:
        lines += [f"**Stopped:** stage `{failed['stage']}` failed ({failed['failure_class']}): "
                  f"{failed['reason']}", ""]
    lines += ["## Stages", "",
              "| stage | status | duration | attempts | final loss | best eval loss | base eval "
              "loss | eval vs targets | adapter |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        targets = ", ".join(f"{k} {_fmt(v.get('value'), 2)}/{_fmt(v.get('target'), 2)} "
                            f"{v.get('status')}" for k, v in r["targets"].items()) or "-"
        adapter = (f"`{r['adapter']}` ({r['adapter_size'] / 1e6:.1f} MB)" if r["adapter"] else "-")
        status = r["status"] + (f" ({r['reason']})" if r["status"] in ("skipped", "pending",
                                                                       "cancelled") and r["reason"]
                                else "")
        lines.append(f"| {r['stage']} | {status} | {_fmt(r['duration_s'], 1)} s | "
                     f"{r['attempts']} | {_fmt(r['final_loss'])} | {_fmt(r['best_eval_loss'])} | "
                     f"{_fmt(r['base_eval_loss'])} | {targets} | {adapter} |")
    lines.append("")
    ran = [f"{r['stage']}: {executor_label(r['executor'])}" for r in rows if r["executor"]]
    if ran:
        lines += [f"Executors: {'; '.join(ran)}.", ""]
    if any(plots.values()):
        lines += ["## Loss curves", ""]
        lines += [f"![loss of {name}]({path.name})" for name, path in plots.items() if path]
        lines.append("")
    from remoteops.server.live_report import summary_lines
    lines += summary_lines(_read_json(run_dir / "summary.json") or {})
    warnings = [(r["stage"], w) for r in rows for w in r["warnings"]]
    lines += ["## Retries and warnings", ""]
    lines += [f"- {stage}: {w}" for stage, w in warnings] or ["- none"]
    lines.append("")
    summary = {"run_id": state["run_id"], "status": state["status"], "stages": rows}
    for title, body in plugin_sections(run_dir, summary, settings, root, pm):
        lines += [f"## {title}", "", body, ""]
    lines += chat_sections(run_dir)
    lines += ["## Reproduce", "", "```bash",
              f"invoke remote-train --host {state.get('host') or 'local'} --stages "
              f"{','.join(s['name'] for s in state['stages'] if s['status'] != 'skipped')} --yes",
              f"invoke remote-train --host {state.get('host') or 'local'} --resume "
              f"{state['run_id']} --yes   # continue this run",
              "# on the server, one stage by hand:",
              f"remoteops-agent train --stage <stage> --run-dir {state['run_dir']}",
              "```", ""]
    path = run_dir / "TRAINING_SUMMARY.md"
    write_atomic_text(path, "\n".join(lines))
    write_atomic_text(run_dir / "run_summary.json", json.dumps(
        {"run_id": state["run_id"], "status": state["status"], "stages": rows,
         "plots": {k: v.name for k, v in plots.items() if v}}, indent=1, default=str) + "\n")
    return path
