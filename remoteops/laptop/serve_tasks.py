"""The ``serve`` and ``chat`` tasks (added to ``laptop.tasks.make_namespace``).

Each parses its flags, calls ``laptop/serve`` and ``laptop/chat``, then prints.
"""

from __future__ import annotations

import json as _json
import sys

from invoke import task

from remoteops.common.errors import RemoteOpsError
from remoteops.common.serving import DEFAULT_PORT, FORMATS_HELP, check_port, describe
from remoteops.laptop.task_wrap import friendly
from remoteops.laptop.tasks import HOST_HELP, _settings, _target_factory

COMMON = {"host": HOST_HELP, "project-root": "the project's folder on the server",
          "trust-host": "record an unknown host key", "json": "print JSON"}


def _say(text: str) -> None:
    print(text, flush=True)


@task(help={**COMMON, "stage": "the stage to serve (default: the last one that finished in "
            "the latest run)", "format": FORMATS_HELP, "port": f"the server's port on its "
            f"127.0.0.1 (default {DEFAULT_PORT}); also the local port unless --local-port",
            "run": "the run to serve from (default: the latest in which the stage finished)",
            "local-port": "the port on this machine (default: the same as --port)",
            "stop": "stop the server on --port (every server of the project without --port)",
            "status": "list what is served, and whether it answers",
            "attach": "forward to a server already running on --port; start nothing",
            "detach": "start the server and return (no forwarding; 'invoke chat' opens its own)",
            "timeout": "seconds to wait for the model to load (default 900)"})
@friendly
def serve(c, host=None, stage=None, format="adapter", port=None, run=None, local_port=None,
          stop=False, status=False, attach=False, detach=False, timeout=900, project_root=None,
          trust_host=False, json=False):
    """Serve a stage (adapter or GGUF) as an OpenAI-compatible chat server, forwarded here.

    Over SSH it forwards a local port in the foreground until Ctrl-C; the server itself runs
    detached on the server (127.0.0.1 only) until 'invoke serve --stop'."""
    from remoteops.laptop import serve as serving

    settings = _settings(project_root=project_root)
    with _target_factory(settings, host, trust_host)() as target:
        if stop:
            result = serving.stop(target, check_port(port) if port else None)
            if json:
                return _say(_json.dumps(result))
            for s in result["stopped"]:
                _say(f"stopped port {s['port']} on {target.describe()}: {s['what']} (pid {s['pid']})")
            return None if result["stopped"] else _say(f"nothing was served on {target.describe()}")
        if status:
            return _print_servers(target.describe(), serving.servers(target), json)
        port = check_port(port or DEFAULT_PORT)
        forwarding = target.kind != "local" and not detach
        if forwarding and not attach:  # before anything starts on the server
            _local_port_free(int(local_port or port))
        if attach:
            entry = serving.find(target, port=port)
        else:
            entry = serving.start(target, stage, format, port, run)
        entry = serving.wait_ready(target, entry, float(timeout), _say)
        _say(f"serving {describe(entry)} on {target.describe()}, its 127.0.0.1:{entry['port']} "
             f"(pid {entry['pid']}): {entry['model']}")
        if target.kind == "local" or detach:
            where = f"http://127.0.0.1:{entry['port']}/v1" if target.kind == "local" else \
                f"reach it with 'invoke serve --attach --port {entry['port']}' (forwarding) or " \
                f"'invoke chat --port {entry['port']}'"
            _say(f"URL: {where}" if target.kind == "local" else where)
            _say("the server runs detached; 'invoke serve --stop' ends it.")
            return None
        try:
            forward = serving.endpoint(target, entry, int(local_port or entry["port"]),
                                       on_error=lambda why: _say(f"a connection failed: {why}"))
            url = forward.__enter__()
        except RemoteOpsError as exc:
            raise RemoteOpsError(f"{exc} The server runs on {target.describe()}: forward to it "
                                 "with 'invoke serve --attach --local-port <port>'.") from None
        try:
            _say(f"URL: {url}  (OpenAI-compatible; model \"{entry['stage']}\"; "
                 "POST /chat/completions)")
            _say("forwarding over SSH until Ctrl-C; the server keeps running after that: "
                 "'invoke serve --stop' ends it, 'invoke chat' talks to it.")
            _forward_until_interrupted(target)
        finally:
            forward.__exit__(None, None, None)
    _say(f"forwarding stopped; port {entry['port']} is still served on {target.describe()} "
         "('invoke serve --stop' ends it).")


def _local_port_free(port: int) -> None:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise RemoteOpsError(f"local port {port} is in use on this machine; choose another "
                                 "with --local-port (nothing was started).") from None


def _forward_until_interrupted(target) -> None:
    import time

    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        return


def _print_servers(where: str, servers: list[dict], as_json: bool) -> None:
    from rich.table import Table

    from remoteops.laptop.render import console, print_json

    if as_json:
        print_json({"target": where, "servers": servers})
        return
    if not servers:
        _say(f"nothing is served on {where}")
        return
    table = Table(title=f"served on {where}", title_justify="left")
    for col in ("port", "stage", "format", "run", "status", "pid", "since", "model"):
        table.add_column(col, overflow="fold")
    for s in servers:
        table.add_row(str(s["port"]), str(s.get("stage")), str(s.get("format")),
                      str(s.get("run_id") or "-"), str(s["status"]), str(s.get("pid")),
                      str(s.get("started")), str(s.get("model")))
    console().print(table)


@task(iterable=["prompt"],
      help={**COMMON, "prompt": "a prompt (give -p again for more; default: an interactive "
            "session, or with --compare the stage's eval prompts)",
            "stage": "talk to the server of this stage",
            "port": "talk to the server on this port", "compare": "'base': put the base "
            "model's answer beside the adapter's, as a table", "report": "with --compare: also "
            "write the table into the run's TRAINING_SUMMARY.md on the server",
            "limit": "with --compare and no prompt: how many eval prompts (default 5)",
            "max-tokens": "longest answer, in tokens (default 128)",
            "temperature": "0 (default) answers greedily, the same every time"})
@friendly
def chat(c, prompt=None, host=None, stage=None, port=None, compare=None, report=False,
         limit=5, max_tokens=128, temperature=None, project_root=None, trust_host=False,
         json=False):
    """Talk to a served stage: -p PROMPT, an interactive session, or --compare base."""
    from remoteops.laptop import chat as client
    from remoteops.laptop import serve as serving

    prompts = [p for p in prompt or [] if p.strip()]
    if compare not in (None, "base"):
        raise RemoteOpsError(f"--compare {compare!r}: only 'base' is known (the base model's "
                             "answer beside the adapter's).")
    settings = _settings(project_root=project_root)
    with _target_factory(settings, host, trust_host)() as target:
        entry = serving.find(target, port=check_port(port) if port else None, stage=stage)
        if entry["status"] != "ready":
            entry = serving.wait_ready(target, entry, 900, _say)
        with serving.endpoint(target, entry) as url:
            names = client.models(url)
            if compare:
                return _compare(target, entry, url, names, prompts, int(limit), int(max_tokens),
                                report, json)
            model = entry["stage"] if entry["stage"] in names else names[0]
            for text in prompts:
                _one(url, model, text, int(max_tokens), float(temperature or 0), json)
            if prompts:
                return None
            _interactive(url, model, int(max_tokens), float(temperature or 0))


def _one(url, model, prompt, max_tokens, temperature, as_json) -> None:
    from remoteops.laptop.chat import complete

    msgs = [{"role": "user", "content": prompt}]
    if as_json:
        _say(_json.dumps({"model": model, **complete(url, model, msgs, max_tokens, temperature)}))
        return
    res = complete(url, model, msgs, max_tokens, temperature,
                   on_text=lambda t: print(t, end="", flush=True))
    print(flush=True)
    print(f"({res['tokens']} tokens, first token after {res['first_token_s']} s, "
          f"{res['tokens_per_s']} tokens/s)", file=sys.stderr, flush=True)


def _interactive(url, model, max_tokens, temperature) -> None:
    from remoteops.laptop.chat import complete

    _say(f"chatting with {model} (an empty line, Ctrl-D or Ctrl-C ends)")
    history: list[dict] = []
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not text:
            return
        history.append({"role": "user", "content": text})
        print(f"{model}> ", end="", flush=True)
        res = complete(url, model, history, max_tokens, temperature,
                       on_text=lambda t: print(t, end="", flush=True))
        print(flush=True)
        history.append({"role": "assistant", "content": res["text"]})


def _compare(target, entry, url, names, prompt, limit, max_tokens, report, as_json) -> None:
    from rich.markup import escape
    from rich.table import Table

    from remoteops.common.serving import BASE_MODEL_ID
    from remoteops.laptop.chat import compare, compare_record
    from remoteops.laptop.render import console

    if BASE_MODEL_ID not in names:
        raise RemoteOpsError(f"--compare base needs the adapter server (the {entry['format']} "
                             "file has the adapter merged in); start it with 'invoke serve "
                             f"--stage {entry['stage']} --format adapter --port <another>'.")
    if prompt:
        prompts = [{"messages": [{"role": "user", "content": text}]} for text in prompt]
    else:
        prompts = target.run_agent("serve-prompts", "--root", target.project_root, "--stage",
                                   entry["stage"], "--limit", str(limit))["prompts"]
    rows = compare(url, entry["stage"], BASE_MODEL_ID, prompts, max_tokens)
    record = compare_record(entry, rows, max_tokens)
    if report:
        record["summary"] = _write_report(target, entry, record)
    if as_json:
        _say(_json.dumps(record, ensure_ascii=False))
        return
    table = Table(title=f"{entry['stage']} (adapter) vs base, greedy, at most {max_tokens} "
                  "tokens", title_justify="left", show_lines=True)
    for col in ("prompt", f"{entry['stage']} (adapter)", "base"):
        table.add_column(col, overflow="fold", ratio=1)
    for row in rows:
        table.add_row(escape(row["prompt"]), escape(row["adapter"]), escape(row["base"]))
    console().print(table)
    if report:
        _say(f"written to the run's report: {record['summary']}")


def _write_report(target, entry, record) -> str:
    if not entry.get("run_id"):
        raise RemoteOpsError(f"stage {entry['stage']} is served without a run (trained by "
                             "hand), so there is no run report to write into; drop --report.")
    run_dir = f"{target.project_root}/outputs/training_sync/{entry['run_id']}"
    name = f"chat_compare_{entry['stage']}.json"
    target.write_bytes(f"{run_dir}/{name}", (_json.dumps(record, indent=1, ensure_ascii=False)
                                             + "\n").encode())
    return target.run_agent("serve-report", "--root", target.project_root, "--run",
                            entry["run_id"], "--file", name)["summary"]


__all__ = ["serve", "chat"]
