"""The laptop's terminal output: rich tables for people, ``--json`` for machines.

The helpers both faces use (and the plugin table) are ``remoteops.tables``."""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterable

from remoteops.common.sizes import human_size

# rich is imported where a table or a bar is drawn: a deploy that prints lines or JSON
# does not pay for it (about 0.1 s of a redeploy).


def console() -> Any:
    from remoteops.tables import console as make

    return make()


def print_json(data: Any) -> None:
    from remoteops.tables import print_json as show

    show(data)


def name_column(table: Any, header: str, **kwargs: Any) -> None:
    from remoteops.tables import name_column as add

    add(table, header, **kwargs)


def print_wide(table: Any) -> None:
    from remoteops.tables import print_wide as show

    show(table)


_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
RUN_STYLE = {"done": "green", "running": "bold cyan", "failed": "bold red", "skipped": "dim",
             "pending": "", "cancelled": "yellow", "dead": "bold red", "error": "bold red"}


def styled_status(status: str) -> str:
    """A run's or stage's status in its colour (rich markup)."""
    style = RUN_STYLE.get(status)
    return f"[{style}]{status}[/]" if style else status


def short_duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def print_checks(target: str, gate: str, results: Iterable[Any], as_json: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

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


def print_settings(items: Iterable[tuple[str, Any, str]], files: list[str], as_json: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

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


def print_built(built: Any, as_json: bool) -> None:
    m = built.manifest
    data = {"bundle": str(built.tar_path), "manifest": str(built.manifest_path),
            "version": m.version, "content_id": m.content_id, "files": len(m.files),
            "size": m.total_size, "compressed": built.tar_path.stat().st_size,
            "reused": built.reused, "source_commit": m.source_commit,
            "source_dirty": m.source_dirty, "plugins": m.plugins,
            "excluded": getattr(built, "excluded", {})}
    if as_json:
        print_json(data)
        return
    note = " (unchanged since the last build)" if built.reused else ""
    print(f"bundle v{m.version} {m.content_id[:12]}{note}: {built.tar_path}")
    print(f"  {len(m.files)} files, {human_size(m.total_size)} "
          f"({human_size(data['compressed'])} compressed), toolkit {m.toolkit_version}")
    _print_exclusions(built)


def _print_exclusions(built: Any) -> None:
    from remoteops.laptop.build import describe_exclusions

    for line in describe_exclusions(getattr(built, "excluded", None) or {}):
        print(f"  {line}")


def print_plan(outcome: Any) -> None:
    plan, m = outcome.plan, outcome.bundle.manifest
    current = plan.get("current_version")
    print(f"deploy v{m.version} ({m.content_id[:12]}) to {outcome.target}:{outcome.root}"
          f" (server has {'v' + str(current) if current else 'nothing deployed'})")
    for event in outcome.events:
        print(f"  {event}")
    outcome.events_shown = len(outcome.events)
    _print_exclusions(outcome.bundle)
    if plan.get("recovery_pending"):
        print(f"  an interrupted change ({plan['recovery_pending']}) will be undone first")
    if not (plan["need"] or plan["delete"]):
        print("  nothing to change: the server already has this bundle")
        return
    files = m.file_map()
    send = sum(files[p].size for p in plan["need"])
    print(f"  {len(plan['added'])} added, {len(plan['changed'])} changed, "
          f"{len(plan['delete'])} deleted, {plan['unchanged']} unchanged; "
          f"{human_size(send)} of files to send")
    rows = ([("+", p) for p in plan["added"]] + [("~", p) for p in plan["changed"]]
            + [("-", p) for p in plan["delete"]])
    for mark, path in rows[:20]:
        print(f"    {mark} {path}")
    if len(rows) > 20:
        print(f"    ... and {len(rows) - 20} more")


def print_deploy(outcome: Any, as_json: bool) -> None:
    if as_json:
        print_json(outcome.to_dict())
        return
    for event in outcome.events[outcome.events_shown:]:  # what happened after the plan
        print(event)
    if outcome.dry_run:
        print("dry run: nothing was changed on the server")
        return
    if outcome.noop:
        print(f"up to date (v{outcome.bundle.manifest.version}); sent "
              f"{human_size(outcome.sent_bytes)} in {outcome.seconds:.2f}s")
        return
    applied = outcome.applied
    if applied.get("recovered"):
        r = applied["recovered"]
        print(f"recovered first: undid an interrupted {r['undone']} ({r['label']}), "
              f"{r['files']} file(s) restored")
    if applied.get("broken_lock"):
        print(f"broke a stale lock left by {applied['broken_lock'].get('holder')}")
    print(f"applied v{applied['version']}: {applied['created']} created, "
          f"{applied['overwritten']} overwritten, {applied['deleted']} deleted; sent "
          f"{human_size(outcome.sent_bytes)} in {outcome.seconds:.2f}s")
    print(f"backup: {applied['backup']}")
    print(f"undo with: invoke rollback --backup {applied['backup_name']}")


@contextlib.contextmanager
def upload_progress(quiet: bool = False):
    """A progress callback(done, total): a rich bar on a terminal, silent otherwise."""
    out = None if quiet else console()
    if out is None or not out.is_terminal:
        yield None
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TransferSpeedColumn,
                               TimeRemainingColumn)

    with Progress("upload", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=out, transient=True) as bar:
        task = None

        def update(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task("upload", total=total)
            bar.update(task, completed=done)

        yield update


def print_rollback(result: dict, as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    if result.get("dry_run"):
        print(f"rollback of {result['backup']} ({result['label']}) would restore "
              f"{len(result['restore'])} file(s) and remove {len(result['remove'])}:")
        for p in result["restore"][:20]:
            print(f"    ~ {p}")
        for p in result["remove"][:20]:
            print(f"    - {p}")
        print("dry run: nothing was changed on the server")
        return
    if result.get("recovered"):
        r = result["recovered"]
        print(f"recovered first: undid an interrupted {r['undone']} ({r['label']})")
    print(f"rolled back to v{result['version']}: {result['overwritten'] + result['created']} "
          f"file(s) restored, {result['deleted']} removed, {result['verified']} verified by hash")
    print(f"backup of the state before the rollback: {result['backup']}")
    print(f"undo with: invoke rollback --backup {result['backup_name']}")


def print_backups(target: str, rows: list[dict], as_json: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    if as_json:
        print_json(rows)
        return
    if not rows:
        print(f"no backups on {target} yet")
        return
    table = Table(title=f"backups on {target}", title_justify="left")
    for col in ("", "backup", "kind", "version", "from", "files", "size"):
        name_column(table, col)
    for r in rows:
        table.add_row("*" if r["current"] else "", escape(r["name"]), r["kind"],
                      f"v{r['version']}", f"v{r['from_version']}" if r["from_version"] else "-",
                      str(r["files"]), human_size(r["size"]))
    print_wide(table)
    print("* current: rolling back to it undoes the latest deploy")
