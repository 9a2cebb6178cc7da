"""``invoke serve`` on the laptop: start a chat server on the target, wait until it answers,
and reach it: over SSH through a forwarded local port (``laptop/tunnel``), on the local
target directly. The server runs detached (``server/serving``); this side only asks.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from remoteops.common.errors import RemoteOpsError
from remoteops.common.serving import describe
from remoteops.common.target import Target


def start(target: Target, stage: str | None, fmt: str, port: int, run: str | None) -> dict:
    args = ["serve-start", "--root", target.project_root, "--format", fmt, "--port", str(port)]
    args += (["--stage", stage] if stage else []) + (["--run", run] if run else [])
    return target.run_agent(*args, timeout=120)


def servers(target: Target) -> list[dict]:
    return target.run_agent("serve-status", "--root", target.project_root)["servers"]


def stop(target: Target, port: int | None) -> dict:
    args = ["serve-stop", "--root", target.project_root] + (["--port", str(port)] if port else [])
    return target.run_agent(*args, timeout=120)


def wait_ready(target: Target, entry: dict, timeout: float,
               show: Callable[[str], None] = lambda m: None) -> dict:
    """Poll until the server answers; a dead one raises with its log's last line."""
    deadline = time.monotonic() + timeout
    said = False
    while entry["status"] == "starting":
        if time.monotonic() > deadline:
            raise RemoteOpsError(f"the chat server on port {entry['port']} did not answer within "
                                 f"{timeout:.0f}s; see its log {entry.get('log')} on "
                                 f"{target.describe()}, or stop it with 'invoke serve --stop'.")
        if not said:
            show(f"loading {describe(entry)} on {target.describe()}...")
            said = True
        time.sleep(1.0)
        entry = find(target, port=entry["port"])
    if entry["status"] == "dead":
        tail = [line for line in entry.get("log_tail", []) if line.strip()][-1:]
        raise RemoteOpsError(f"the chat server on port {entry['port']} died: "
                             f"{tail[0] if tail else 'no output'} (log {entry.get('log')}); "
                             "clear it with 'invoke serve --stop'.")
    return entry


def find(target: Target, port: int | None = None, stage: str | None = None) -> dict:
    """The server to talk to: the one on ``port``, else serving ``stage``, else the only one."""
    found = servers(target)
    if port:
        found = [s for s in found if s["port"] == port]
    elif stage:
        found = [s for s in found if s.get("stage") == stage]
    where = target.describe()
    if not found:
        what = f"on port {port}" if port else f"for stage {stage}" if stage else ""
        raise RemoteOpsError(f"nothing is served {what} on {where}; start it with 'invoke serve"
                             f"{' --stage ' + stage if stage else ''}'.".replace("  ", " "))
    if len(found) > 1:
        listed = ", ".join(f"port {s['port']} ({describe(s)})" for s in found)
        raise RemoteOpsError(f"{len(found)} servers run on {where} ({listed}); pick one with "
                             "--port.")
    return found[0]


@contextlib.contextmanager
def endpoint(target: Target, entry: dict, local_port: int = 0,
             on_error: Callable[[str], None] | None = None) -> Iterator[str]:
    """The base URL (``.../v1``) of a served model, reachable from this machine while open;
    ``on_error`` hears each connection the forward could not pass on."""
    if target.kind == "local":
        yield f"http://127.0.0.1:{entry['port']}/v1"
        return
    from remoteops.laptop.tunnel import Forward

    with Forward(lambda: target.connection.transport, entry["port"], local_port,
                 on_error=on_error) as fwd:
        try:
            yield fwd.url
        except RemoteOpsError:
            if fwd.errors:  # the forward's own reason beats "cannot reach the server"
                raise RemoteOpsError(f"{fwd.errors[-1]}.") from None
            raise


__all__ = ["start", "servers", "stop", "wait_ready", "find", "endpoint"]
