"""Terminal output: rich tables for people, ``--json`` for machines."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def console() -> Console:
    return Console(soft_wrap=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_checks(target: str, gate: str, results: Iterable[Any], as_json: bool) -> None:
    rows = [r.to_dict() for r in results]
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "warn", "fail", "skip")}
    if as_json:
        print_json({"target": target, "gpu_gate": gate, "ok": counts["fail"] == 0,
                    "counts": counts, "checks": rows})
        return
    table = Table(title=f"precheck on {target} (gpu gate: {gate})", title_justify="left")
    for col in ("check", "status", "value", "hint"):
        table.add_column(col, overflow="fold")
    for r in rows:
        style = _STYLE.get(r["status"], "")
        table.add_row(escape(r["name"]), f"[{style}]{r['status']}[/]", escape(r["value"]),
                      escape(r["hint"]))
    out = console()
    out.print(table)
    verdict = "[bold red]FAILED[/]" if counts["fail"] else "[green]passed[/]"
    out.print(f"precheck {verdict}: {counts['ok']} ok, {counts['warn']} warn, "
              f"{counts['fail']} fail, {counts['skip']} skipped")


def print_plugins(infos: Iterable[Any], as_json: bool) -> None:
    rows = [i.to_dict() for i in infos]
    if as_json:
        print_json(rows)
        return
    table = Table(title="remoteops plugins", title_justify="left")
    for col in ("name", "version", "source", "hooks", "location"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(escape(x) for x in (r["name"], r["version"], r["source"],
                                             ", ".join(r["hooks"]), r["location"])))
    console().print(table)


def print_settings(items: Iterable[tuple[str, Any, str]], files: list[str], as_json: bool) -> None:
    items = list(items)
    if as_json:
        print_json({k: {"value": v, "source": s} for k, v, s in items})
        return
    table = Table(title="effective settings", title_justify="left",
                  caption="files read: " + (", ".join(files) or "none"), caption_justify="left")
    for col in ("setting", "value", "source"):
        table.add_column(col, overflow="fold")
    for key, value, source in items:
        shown = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
        table.add_row(escape(key), escape(shown),
                      escape(source) if source != "default" else "[dim]default[/]")
    console().print(table)
