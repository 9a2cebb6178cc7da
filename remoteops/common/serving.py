"""Serving a trained stage (both sides): formats, ports, and where a server's files live.

``invoke serve`` starts one OpenAI-compatible chat server per port on the server side,
detached like a run. Its files are in ``<root>/.remoteops/serve/``: ``<port>.json`` (the
state: pid and process identity, port, format, model, stage, run, started), ``<port>.lock``
(an OS file lock the serving process holds for its whole life, so a second server on the
same port is refused however it was started) and ``<port>.log``. The server binds
127.0.0.1 only; the laptop reaches it through the SSH connection (a direct-tcpip channel).
"""

from __future__ import annotations

import re
from pathlib import Path

from remoteops.common.errors import RemoteOpsError

DEFAULT_PORT = 8800
SERVE_DIR = Path(".remoteops") / "serve"
FORMATS_HELP = "adapter, or gguf:<type> (gguf:q4_k_m, gguf:q8_0, gguf:f16)"
BASE_MODEL_ID = "base"  # the adapter server's name for the base model (adapter switched off)
_GGUF = re.compile(r"gguf:([a-z0-9_]+)")


def parse_format(text: str | None) -> tuple[str, str | None]:
    """``"adapter"`` -> ("adapter", None); ``"gguf:q4_k_m"`` -> ("gguf", "q4_k_m")."""
    value = (text or "adapter").strip().lower()
    if value == "adapter":
        return "adapter", None
    if value == "gguf":
        return "gguf", "q4_k_m"
    m = _GGUF.fullmatch(value)
    if not m:
        raise RemoteOpsError(f"--format {text!r} is not understood; use {FORMATS_HELP}.")
    return "gguf", m.group(1)


def check_port(port: int | str) -> int:
    try:
        value = int(port)
    except (TypeError, ValueError):
        value = -1
    if not 1024 <= value <= 65535:
        raise RemoteOpsError(f"--port {port!r} is not a usable port; give a number from 1024 to "
                             f"65535 (default {DEFAULT_PORT}).")
    return value


def serve_dir(root: str | Path) -> Path:
    return Path(root) / SERVE_DIR


def state_path(root: str | Path, port: int) -> Path:
    return serve_dir(root) / f"{int(port)}.json"


def lock_path(root: str | Path, port: int) -> Path:
    return serve_dir(root) / f"{int(port)}.lock"


def log_path(root: str | Path, port: int) -> Path:
    return serve_dir(root) / f"{int(port)}.log"


def describe(entry: dict) -> str:
    """One line naming what a server serves, e.g. ``stage all (gguf:q4_k_m, run run_X)``."""
    fmt = entry.get("format") or "?"
    run = f", run {entry['run_id']}" if entry.get("run_id") else ""
    return f"stage {entry.get('stage') or '?'} ({fmt}{run})"


__all__ = ["DEFAULT_PORT", "BASE_MODEL_ID", "FORMATS_HELP", "parse_format", "check_port",
           "serve_dir", "state_path", "lock_path", "log_path", "describe"]
