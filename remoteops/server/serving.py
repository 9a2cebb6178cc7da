"""The server's part of ``invoke serve``: find what to serve, start it detached, probe, stop.

What: a stage's adapter (served by ``remoteops.trainer.serve_adapter``, transformers + peft,
with the base model beside it under the name ``base``) or one of its GGUF files (served by
llama-cpp-python's own OpenAI-compatible server, ``remoteops.quant.serve_gguf``). Which run:
``--run``, else the latest run in which the stage finished; with no ``--stage``, the last
stage that finished in the latest run that has one. A stage trained by hand
(``remoteops-agent train``, no run) is found in ``outputs/adapter/adapter_<stage>``.

How: like a run (``server/pipeline.spawn_detached``: new session, no terminal, output to a
log). ``start`` takes the port's lock, checks the port is free on 127.0.0.1, writes the
state and hands the locked descriptor to the serving process, which holds it until it
ends: a second server on the same port is refused while the first lives. ``stop`` stops
the whole process tree (``server/proctree``) and removes the state.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from remoteops.common.clock import now_iso
from remoteops.common.errors import ConfigError, RemoteOpsError
from remoteops.common.files import write_atomic_json
from remoteops.common.locks import FileLock, LockedError, identity_alive, process_identity
from remoteops.common.runs import list_runs, read_state
from remoteops.common.serving import (describe, lock_path, log_path, parse_format, serve_dir,
                                      state_path)

HOST = "127.0.0.1"  # never another address: the laptop comes in through SSH


# -- what to serve ---------------------------------------------------------------------------

def _done_stages(state: dict) -> list[str]:
    return [s["name"] for s in state["stages"] if s.get("status") == "done"
            and s.get("kind") in ("train", "command")]


def pick_run(project: Path, stage: str | None, run_id: str | None) -> tuple[dict | None, str]:
    """The run state to serve from and the stage; (None, stage) for a stage with no run."""
    runs = [r for r in list_runs(project) if r["status"] != "damaged"]
    if run_id:
        match = [r for r in runs if r["run_id"] == run_id]
        if not match:
            raise RemoteOpsError(f"no run {run_id!r} on this server; 'invoke runs' lists them.")
        runs = match
    for entry in reversed(runs):
        state = read_state(Path(entry["run_dir"]))
        done = _done_stages(state)
        if stage and stage in done:
            return state, stage
        if not stage and done:
            return state, done[-1]
    if run_id:
        what = f"stage {stage!r}" if stage else "no training stage"
        raise RemoteOpsError(f"run {run_id} has {what} finished; pick another --run or --stage "
                             "('invoke runs' lists them).")
    if stage:
        return None, stage  # perhaps trained by hand: the adapter folder decides
    raise RemoteOpsError("no run on this server has a finished training stage yet; train one "
                         "with 'invoke remote-train', or name it with --stage.")


def _stage_paths(settings, project: Path, stage: str) -> tuple[Path | None, Path]:
    """(base model, default adapter folder) of a configured stage; base None when unknown."""
    from remoteops.trainer.stageconf import resolve_stage

    try:
        cfg = resolve_stage(settings, stage)
        return cfg.base_model, cfg.adapter_dir
    except ConfigError:  # a command stage: no dataset, but [train] base_model still applies
        base = settings.get("train.base_model")
        path = Path(os.path.expanduser(str(base))) if base else None
        if path is not None and not path.is_absolute():
            path = project / path
        return path, project / "outputs" / "adapter" / f"adapter_{stage}"


def _adapter_of(project: Path, state: dict | None, stage: str, default: Path) -> Path:
    found: list[str] = []
    if state is not None:
        entry = next(s for s in state["stages"] if s["name"] == stage)
        outs = entry.get("outputs") or {}
        if isinstance(outs, dict):
            found += [outs["adapter"]] if isinstance(outs.get("adapter"), str) else []
            found += [p for p in outs.get("declared") or [] if isinstance(p, str)]
    for rel in found:
        path = project / rel
        if (path / "adapter_config.json").is_file():
            return path
    if (default / "adapter_config.json").is_file():
        return default
    raise RemoteOpsError(f"stage {stage!r} has no adapter on this server (looked in "
                         f"{', '.join(found) or default}); train it first with "
                         f"'invoke remote-train --stages {stage}'.")


def _gguf_of(settings, project: Path, run_dir: Path | None, stage: str, quant: str) -> Path:
    if run_dir is not None:  # what the stage's GGUF check recorded
        try:
            rows = json.loads((run_dir / f"quant_{stage}.json").read_text())["checks"]["gguf"]["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            rows = []
        for row in rows:
            if isinstance(row, dict) and row.get("type") == quant and row.get("file") \
                    and Path(row["file"]).is_file():
                return Path(row["file"])
    out = Path(str((settings.get("plugins.quant") or {}).get("out_dir", "outputs/quant")))
    folder = (out if out.is_absolute() else project / out) / stage / "gguf"
    path = folder / f"model-{quant}.gguf"
    if path.is_file():
        return path
    have = sorted(p.stem.replace("model-", "gguf:") for p in folder.glob("model-*.gguf"))
    hint = f" (this stage has {', '.join(have)})" if have else ""
    raise RemoteOpsError(f"stage {stage!r} has no GGUF {quant} at {path}{hint}; make it with "
                         f"'remoteops-agent quant --stage {stage} --only gguf' on the server "
                         "(types from [plugins.quant_gguf] types), or serve --format adapter.")


def resolve(project: Path, settings, stage: str | None, fmt: str, run_id: str | None) -> dict:
    """Everything the serving process needs, as the state file records it."""
    kind, quant = parse_format(fmt)
    state, stage = pick_run(project, stage, run_id)
    run_dir = Path(state["run_dir"]) if state else None
    base, default_adapter = _stage_paths(settings, project, stage)
    spec = {"stage": stage, "run_id": state["run_id"] if state else None,
            "format": "adapter" if kind == "adapter" else f"gguf:{quant}",
            "run_dir": str(run_dir) if run_dir else None}
    if kind == "adapter":
        adapter = _adapter_of(project, state, stage, default_adapter)
        if base is None or not (base / "config.json").is_file():
            try:
                named = json.loads((adapter / "adapter_config.json").read_text())
                base = Path(named["base_model_name_or_path"])
            except (OSError, ValueError, KeyError):
                base = None
        if base is None or not (base / "config.json").is_file():
            raise RemoteOpsError(f"the base model of stage {stage!r} ({base}) is not on this "
                                 "server; set train.base_model to its folder.")
        spec.update(model=str(adapter), base_model=str(base))
    else:
        spec.update(model=str(_gguf_of(settings, project, run_dir, stage, quant)),
                    base_model=str(base) if base else None)
    return spec


# -- start, probe, stop -----------------------------------------------------------------------

def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def read_entry(root: Path, port: int) -> dict | None:
    try:
        data = json.loads(state_path(root, port).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _refusal(root: Path, port: int) -> RemoteOpsError:
    held = read_entry(root, port) or {}
    what = describe(held) if held.get("stage") else "a model"
    return RemoteOpsError(
        f"port {port} is already served here: {what}, pid {held.get('pid', '?')}, since "
        f"{held.get('started', '?')}; stop it with 'invoke serve --stop --port {port}' or "
        "choose another --port.")


def start(root: Path, spec: dict, port: int, spawn, wait_s: float = 30.0) -> dict:
    """Start the serving process for ``spec`` on ``port``; waits up to ``wait_s`` for it to
    answer. ``spawn(port, lock_fd, log)`` starts it and returns its ``Popen``."""
    lock = FileLock(lock_path(root, port), f"serve {port}")
    try:
        lock.acquire()
    except LockedError:
        raise _refusal(root, port) from None
    try:
        if not port_free(port):
            raise RemoteOpsError(f"port {port} is in use on this server by another program; "
                                 "choose another --port.")
        entry = {**spec, "port": port, "host": HOST, "status": "starting",
                 "started": now_iso(), "log": str(log_path(root, port))}
        log_path(root, port).write_bytes(b"")
        write_atomic_json(state_path(root, port), entry, indent=1)
        proc = spawn(port, lock.hand_over(), log_path(root, port))
        entry.update(pid=proc.pid, identity=process_identity(proc.pid))
        write_atomic_json(state_path(root, port), entry, indent=1)
        lock.update(pid=proc.pid, identity=entry["identity"], port=port)
    except BaseException:
        lock.release()
        raise
    lock.let_go()
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        status = probe(entry)
        if status != "starting" or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    proc.poll()  # reap it if it died at once (we are its parent)
    return {**entry, **health(root, entry)}


def probe(entry: dict) -> str:
    """ready (the HTTP server answers /v1/models), starting (alive, not yet), or dead."""
    if identity_alive(entry.get("identity")) is False:
        return "dead"
    try:
        with urllib.request.urlopen(f"http://{HOST}:{entry['port']}/v1/models", timeout=3) as r:
            return "ready" if r.status == 200 else "starting"
    except (urllib.error.URLError, OSError, ValueError):
        return "starting"


def _tail(path: Path, lines: int = 6) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 16384))
            return fh.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []


def health(root: Path, entry: dict) -> dict:
    status = probe(entry)
    out = {"status": status}
    if status == "dead":
        out["log_tail"] = _tail(log_path(root, entry["port"]))
    return out


def listing(root: Path, probe_http: bool = True) -> list[dict]:
    """Every server of this project root with its probed status, by port; without
    ``probe_http`` only whether its process lives (running or dead), for cheap listings."""
    folder = serve_dir(root)
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if not path.stem.isdigit():
            continue
        entry = read_entry(root, int(path.stem))
        if entry and isinstance(entry.get("port"), int):
            alive = identity_alive(entry.get("identity")) is not False
            out.append({**entry, **(health(root, entry) if probe_http else
                                    {"status": "running" if alive else "dead"})})
    return out


def stop(root: Path, port: int | None, grace: float) -> dict:
    """Stop the server on ``port`` (every server of the root when None) and its whole tree."""
    from remoteops.common.locks import pid_alive
    from remoteops.server.proctree import descendants, stop_tree

    entries = [read_entry(root, port)] if port else [
        read_entry(root, int(p.stem)) for p in sorted(serve_dir(root).glob("*.json"))
        if p.stem.isdigit()] if serve_dir(root).is_dir() else []
    entries = [e for e in entries if e]
    if port and not entries:
        raise RemoteOpsError(f"nothing is served on port {port} here; 'invoke serve --status' "
                             "lists what is.")
    stopped, left = [], []
    for entry in entries:
        pid = entry.get("pid")
        if identity_alive(entry.get("identity")):
            stop_tree([pid], grace)
        tree = descendants([pid]) if isinstance(pid, int) else {}
        alive = [p for p in tree if pid_alive(p)  # zombies are gone for good
                 and (p != pid or identity_alive(entry.get("identity")))]
        if alive:
            left.append({"port": entry["port"], "pids": alive})
            continue
        for path in (state_path(root, entry["port"]), lock_path(root, entry["port"])):
            path.unlink(missing_ok=True)
        stopped.append({"port": entry["port"], "pid": pid, "what": describe(entry)})
    return {"stopped": stopped, "left": left}


__all__ = ["resolve", "pick_run", "start", "stop", "probe", "health", "listing", "read_entry",
           "port_free", "HOST"]
