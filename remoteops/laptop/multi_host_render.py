"""``status`` and ``runs`` on several hosts: one table with a host column.

A host that could not answer gets a row saying so (its error follows the table).
"""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from remoteops.laptop.multi_host import GroupResult
from remoteops.laptop.render import name_column, print_wide, short_duration, styled_status


def _overrides(data: dict) -> str:
    extra = (data.get("options") or {}).get("overrides") or {}
    return " ".join(f"{k}={v}" for k, v in sorted(extra.items())) or "-"


def _now(data: dict) -> str:
    cur = data.get("current") or {}
    if not cur:
        return "-"
    text = f"{cur['stage']}"
    if "step" in cur:
        total = f"/{cur['total_steps']}" if cur.get("total_steps") else ""
        text += f" step {cur['step']}{total} loss {cur['loss']:.4f}"
    return text


def print_status_table(group: GroupResult) -> None:
    table = Table(title=f"runs on {len(group.results)} hosts", title_justify="left")
    for col in ("host", "run", "status"):
        name_column(table, col)
    for col in ("stages", "now", "overrides"):
        table.add_column(col, overflow="fold")
    for r in group.results:
        data = r.value
        if not isinstance(data, dict):
            table.add_row(escape(r.host), "-", styled_status("error"), "(below)", "-", "-")
            continue
        if not data.get("run_id"):
            table.add_row(escape(r.host), "-", "no runs", "", "-", "-")
            continue
        stages = " ".join(f"{s['name']}:{s['status']}" for s in data.get("stages") or [])
        node = data.get("node")  # a run spanning several hosts: this host's part
        run = data["run_id"] + (f" (node {node['rank']} of {node['nnodes']})" if node else "")
        table.add_row(escape(r.host), run, styled_status(data["status"]), escape(stages),
                      escape(_now(data)), escape(_overrides(data)))
    print_wide(table)


def print_runs_table(group: GroupResult) -> None:
    table = Table(title=f"pipeline runs on {len(group.results)} hosts", title_justify="left")
    for col in ("host", "run", "started", "status"):
        name_column(table, col)
    table.add_column("stages", overflow="fold")
    name_column(table, "time")
    table.add_column("best eval loss", overflow="fold")
    for r in group.results:
        if not r.ok:
            table.add_row(escape(r.host), "-", "-", styled_status("error"), "(below)", "-", "-")
            continue
        if not r.value:
            table.add_row(escape(r.host), "-", "-", "no runs", "", "-", "-")
        for run in r.value or []:
            stages = run.get("reason") or " ".join(f"{n}:{s}" for n, s in run["stages"].items())
            best = " ".join(f"{k}={v:.3f}" for k, v in run["best"].items()
                            if v is not None) or "-"
            table.add_row(escape(r.host), run["run_id"], run["created"], styled_status(run["status"]),
                          escape(stages), short_duration(run["duration_s"]), best)
    print_wide(table)


__all__ = ["print_status_table", "print_runs_table"]
