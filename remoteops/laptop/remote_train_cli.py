"""What the laptop shows while training: the plan, the live stage view, status, logs, runs."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable

from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from remoteops.common.errors import RemoteOpsError
from remoteops.common.runs import executor_label
from remoteops.common.serving import describe
from remoteops.common.sizes import human_size
from remoteops.laptop.render import (console, name_column, print_json, print_wide,
                                     short_duration, styled_status)


def _stage_table(data: dict) -> Table:
    table = Table(title=f"{data['run_id']} on {escape(data.get('host') or 'server')}: "
                        f"{styled_status(data['status'])}",
                  title_justify="left")
    name_column(table, "stage")
    for col in ("status", "time", "try", "run as", "note"):
        table.add_column(col, overflow="fold")
    for s in data["stages"]:
        note = s.get("failure_class") or ""
        if s.get("reason"):
            note = f"{note}: {s['reason']}" if note else s["reason"]
        status = s["status"]
        shown = styled_status(status)
        if s.get("health") and status in ("running", "done"):  # the health window passed
            shown += " [green](healthy)[/]"
            note = note or f"healthy: {s['health'].get('how', '')}"
        table.add_row(s["name"], shown, short_duration(s.get("duration_s")),
                      str(s.get("attempt") or "-"), executor_label(s.get("executor")),
                      escape(note[:90]))
    return table


def _current_line(data: dict) -> str:
    cur = data.get("current") or {}
    if not cur:
        return ""
    parts = [f"stage {cur['stage']}"]
    if "step" in cur:
        total = f"/{cur['total_steps']}" if cur.get("total_steps") else ""
        parts.append(f"step {cur['step']}{total}")
        parts.append(f"loss {cur['loss']:.4f}")
    if cur.get("tokens_per_s"):
        parts.append(f"{cur['tokens_per_s']:.0f} tok/s")
    if cur.get("eta_s") is not None:
        parts.append(f"ETA {short_duration(cur['eta_s'])}")
    data = cur.get("data") or {}
    if data.get("line"):  # live data: "waiting for data 12/50", growth
        waited = data.get("waiting_s")
        parts.append(_printable(data["line"]) +
                     (f" (for {short_duration(waited)})" if waited is not None else ""))
    return "  ".join(parts)


def base_model_line(data: dict) -> tuple[str, str] | None:
    """The base model's download (``invoke fetch-model``) as the agent words it, with its
    style; None when none runs or failed lately (or the agent is older)."""
    fetch = data.get("base_model")
    if not isinstance(fetch, dict) or not fetch.get("line"):
        return None
    failed = fetch.get("status") in ("failed", "dead")
    return _printable(fetch["line"]), "bold red" if failed else "cyan"


def render_status(data: dict, note: str = "") -> Group:
    items: list[Any] = [_stage_table(data)] if data.get("run_id") else []
    line = _current_line(data)
    if line:
        items.append(Text(line, style="cyan"))
    fetch = base_model_line(data)
    if fetch:
        items.append(Text(*fetch))
    if data.get("log_tail"):
        items.append(Text("\n".join(l[-160:] for l in data["log_tail"][-6:]), style="dim"))
    if note:
        items.append(Text(note, style="yellow"))
    return Group(*items)


def print_status(data: dict, as_json: bool) -> None:
    if as_json:
        print_json(data)
        return
    console().print(render_status(data))
    if not data.get("run_id"):  # only the base model's download so far
        print("no pipeline runs yet; start one with 'invoke remote-train'")
    for entry in data.get("serving") or []:  # invoke serve: what this root serves now
        print(f"serving on port {entry['port']}: {describe(entry)} {entry['status']} "
              f"(pid {entry.get('pid')}; 'invoke serve --status' probes it)")
    if data["status"] == "dead":
        age = data.get("runner_health", {}).get("heartbeat_age_s")
        print(f"the runner is dead (last heartbeat {age}s ago); continue with: "
              f"invoke remote-train --resume {data['run_id']}")


class _PlainFollower:
    """Without a terminal: one line per change instead of a live view."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}
        self.healthy: set[str] = set()
        self.fetch: str | None = None
        self.data_line = ""

    def __call__(self, data: dict | None, note: str) -> None:
        if note:
            print(note, flush=True)
        if data is None:
            return
        fetch = (data.get("base_model") or {}).get("status")
        if fetch != self.fetch:  # the base model's download: when it starts and ends
            self.fetch = fetch
            line = base_model_line(data)
            if line:
                print(f"{time.strftime('%H:%M:%S')} {line[0]}", flush=True)
        data_line = ((data.get("current") or {}).get("data") or {}).get("line") or ""
        if data_line != self.data_line and (data_line.startswith("waiting") or
                                            self.data_line.startswith("waiting")):
            self.data_line = data_line  # a wait for data, and its end: not every step
            if data_line:
                print(f"{time.strftime('%H:%M:%S')} {_printable(data_line)}", flush=True)
        for s in data["stages"]:
            if self.seen.get(s["name"]) != s["status"]:
                self.seen[s["name"]] = s["status"]
                extra = f" ({s.get('failure_class')}: {s.get('reason')})" if s["status"] == \
                    "failed" else ""
                print(f"{time.strftime('%H:%M:%S')} {s['name']}: {s['status']}{extra}", flush=True)
            if s.get("health") and s["name"] not in self.healthy:
                self.healthy.add(s["name"])
                print(f"{time.strftime('%H:%M:%S')} {s['name']}: healthy "
                      f"({s['health'].get('how', '')})", flush=True)


@contextlib.contextmanager
def _follower():
    out = console()
    if not out.is_terminal:
        yield _PlainFollower()
        return
    with Live(console=out, refresh_per_second=4, transient=False) as live:
        def show(data: dict | None, note: str) -> None:
            if data is not None:
                show.last = data
            if getattr(show, "last", None) is not None:
                live.update(render_status(show.last, note))
            elif note:
                live.update(Text(note, style="yellow"))
        yield show


def run_remote_train(settings, open_target: Callable, stages: list[str] | None, resume: Any,
                     detach: bool, deploy: bool, as_json: bool, confirm) -> int:
    """The whole remote-train flow; returns the exit status."""
    from remoteops.laptop.collect import in_place
    from remoteops.laptop.remote_train import (TrainRequest, base_model_to_server,
                                               check_executors_here, check_layout_here,
                                               collect_and_report,
                                               describe_plan, follow, refuse_if_live, start)

    req = TrainRequest(None, stages, settings["skip_sample"], resume, detach, deploy)
    target = open_target()
    try:
        check_layout_here(settings, req, [target.describe()])  # nnodes > 1 needs more hosts
        for line in describe_plan(settings, target, req):
            print(line)
        check_executors_here(settings, req)
        if confirm is not None and not confirm({}):
            raise RemoteOpsError("cancelled; nothing was started.")
        if deploy and settings["pipeline.deploy"] and not in_place(target, settings.project_dir):
            refuse_if_live(target)  # before anything is built, sent or changed
            from remoteops.laptop.deploy import deploy as deploy_bundle
            from remoteops.laptop.render import print_plan

            outcome = deploy_bundle(settings, target, on_plan=None if as_json else print_plan)
            if outcome.applied:
                print(f"deployed v{outcome.applied['version']} (backup "
                      f"{outcome.applied['backup_name']})")
        if deploy:
            from remoteops.laptop.fetch_model import describe
            from remoteops.laptop.render import upload_progress

            with upload_progress(quiet=as_json) as progress:
                sent = base_model_to_server(settings, target, req, progress,
                                            lambda line: print(f"base model {line}", flush=True))
            if sent and sent["sent"]:
                print(f"base model {describe(sent)}", flush=True)
        started = start(settings, target, req)
        run_id = started["run_id"]
        print(f"started {run_id} on {target.describe()} (runner pid {started['pid']})",
              flush=True)
        reattach = (f"reattach with: invoke status {run_id} | invoke logs --run {run_id} -f | "
                    f"invoke remote-train --resume {run_id}")
        if detach:
            print(f"detached; the run goes on. {reattach}; then: invoke collect --run {run_id}")
            return 0
        try:
            with _follower() as show:
                data, target = follow(open_target, target, run_id, show,
                                      float(settings["pipeline.poll_seconds"]))
        except KeyboardInterrupt:
            print(f"\ndetached (Ctrl-C); the run goes on on the server. {reattach}")
            return 0
        if data["status"] != "done":
            failed = next((s for s in data["stages"] if s["status"] == "failed"), None)
            why = (f"stage {failed['name']} failed ({failed['failure_class']}): {failed['reason']}"
                   if failed else f"the run is {data['status']}")
            print(f"{why}; fix it and continue with: invoke remote-train --resume {run_id}",
                  file=sys.stderr)
        result = collect_and_report(settings, target, run_id, download_progress(as_json))
        if as_json:
            for line in collect_warnings(result):
                print(line, file=sys.stderr)
            print_json({**result, "run_id": run_id})
        else:
            print_collected(result, False)
        return 0 if data["status"] == "done" else 1
    finally:
        target.close()


def stream_logs(open_target: Callable, run: str | None, stage: str | None, follow: bool,
                lines: int) -> None:
    target = open_target()
    try:
        base = ["pipeline-logs", "--root", target.project_root]
        base += (["--run", run] if run else []) + (["--stage", stage] if stage else [])
        data = target.run_agent(*base, "--lines", str(lines))
        sys.stdout.write(data["text"])
        offset, run_id = data["offset"], data["run_id"]
        while follow:
            time.sleep(1.0)
            try:
                data = target.run_agent("pipeline-logs", "--root", target.project_root, "--run",
                                        run_id, *(["--stage", stage] if stage else []),
                                        "--offset", str(offset))
            except (RemoteOpsError, OSError, EOFError) as exc:
                print(f"[connection lost ({exc}); reconnecting]", file=sys.stderr)
                time.sleep(2)
                target.close()
                target = open_target()
                continue
            sys.stdout.write(data["text"])
            sys.stdout.flush()
            offset = data["offset"]
            if data["status"] not in ("running", "starting") and not data["text"]:
                print(f"[run {run_id} is {data['status']}]")
                return
    except KeyboardInterrupt:
        print()
    finally:
        target.close()


def print_runs(runs: list[dict], as_json: bool) -> None:
    if as_json:
        print_json(runs)
        return
    if not runs:
        print("no runs yet; start one with: invoke remote-train")
        return
    table = Table(title="pipeline runs", title_justify="left")
    for col in ("run", "started", "status"):
        name_column(table, col)
    table.add_column("stages", overflow="fold")
    name_column(table, "time")
    table.add_column("best eval loss", overflow="fold")
    for r in runs:
        stages = r.get("reason") or " ".join(f"{n}:{s}" for n, s in r["stages"].items())
        best = " ".join(f"{k}={v:.3f}" for k, v in r["best"].items() if v is not None) or "-"
        table.add_row(r["run_id"], r["created"], styled_status(r["status"]),
                      stages, short_duration(r["duration_s"]), best)
    print_wide(table)


@contextlib.contextmanager
def _bar(total: int):
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress("collect", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console(), transient=True) as bar:
        task = bar.add_task("collect", total=total)
        yield lambda n: bar.update(task, advance=n)


def download_progress(quiet: bool):
    return None if quiet or not console().is_terminal else _bar


def _printable(value: Any) -> str:
    """Text from the server, shown without its control characters (no terminal escapes)."""
    return "".join(c if c.isprintable() else "?" for c in str(value))


def collect_warnings(data: dict) -> list[str]:
    """One line per thing collect left behind, saying what to do about it."""
    lines = []
    skipped = data.get("skipped") or []
    if skipped:
        names = ", ".join(f"{s['path']} ({s['reason']})" for s in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        lines.append(f"warning: skipped {len(skipped)} file(s): {names}{more}; run 'invoke "
                     "collect' again once the run has finished to bring them back")
    for r in data.get("refused") or []:
        if not isinstance(r, dict):
            continue
        stage = f" (stage {r['stage']})" if r.get("stage") else ""
        lines.append(_printable(f"warning: the server did not list {r.get('path')!r}{stage}: "
                                f"{r.get('reason')}; declare stage outputs inside the project"))
    return lines


def print_collected(data: dict, as_json: bool) -> None:
    for line in collect_warnings(data):
        print(line, file=sys.stderr)
    if as_json:
        print_json(data)
        return
    if data["in_place"]:
        print("collect: results are already here (local target, in place)")
    else:
        print(f"collected {len(data['fetched'])} file(s), {human_size(data['bytes'])} "
              f"({data['unchanged']} already here) in {data['seconds']:.1f}s")
    if data.get("summary"):
        print(f"summary: {data['summary']}")
    if data.get("closure_report"):
        print(f"closure report: {data['closure_report']}")
