"""Health from a log file and a heartbeat, for trainers we do not run in-process.

Pure Python (no torch). ``check_log`` reads a log (the tail of it for big
files), parses losses with a configurable pattern (``health.loss_pattern``,
first group = the loss), and returns a ``Verdict``: ``ok``, or failed with a
reason — ``nan``, ``divergence``, ``oom``, ``cuda``, ``traceback`` — or
``stale`` when neither the log nor the heartbeat moved for ``stale_seconds``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from remoteops.common.defaults import HEALTH_DEFAULTS

_OOM = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.I)
_CUDA = re.compile(r"CUDA error|cudaError|CUDNN_STATUS|NCCL error|device-side assert|"
                   r"illegal memory access|CUDA driver|no kernel image", re.I)
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):", re.M)
_NAN_WORD = re.compile(r"(?<![\w])(nan|inf)(?![\w])", re.I)


@dataclass
class Verdict:
    """The result of one check; ``reason`` is empty when ``ok``."""

    ok: bool
    reason: str = ""
    message: str = ""
    line: int | None = None
    losses: list[float] = field(default_factory=list)
    last_loss: float | None = None
    age_s: float | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["losses"] = d["losses"][-20:]
        return d


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def parse_losses(text: str, pattern: str | None = None) -> list[tuple[int, float]]:
    """``(line number, loss)`` for every loss the pattern finds (NaN and inf included)."""
    regex = re.compile(pattern or HEALTH_DEFAULTS["loss_pattern"], re.I)
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in regex.finditer(line):
            out.append((lineno, _number(m.group(1))))
    return out


def judge_losses(losses: list[tuple[int, float]], loss_max: float,
                 explode_ratio: float) -> tuple[str, str, int] | None:
    """The first NaN/inf or exploding loss as ``(reason, message, line)``."""
    low = math.inf
    for lineno, loss in losses:
        if not math.isfinite(loss):
            return "nan", f"loss is {loss} (log line {lineno})", lineno
        if loss > loss_max:
            return "divergence", f"loss {loss:.4g} above {loss_max:g} (log line {lineno})", lineno
        if math.isfinite(low) and loss > explode_ratio * low and loss - low > 1.0:
            return "divergence", (f"loss {loss:.4g} is over {explode_ratio:g}x the lowest "
                                  f"({low:.4g}) (log line {lineno})"), lineno
        low = min(low, loss)
    return None


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def check_text(text: str, pattern: str | None = None, loss_max: float | None = None,
               explode_ratio: float | None = None, rules: list | None = None) -> Verdict:
    """Classify a log's text; the earliest problem in the log wins.

    ``rules`` are ``health_rules`` plugins' rules, run on each loss read (its step is
    its position among the losses, from 1).
    """
    loss_max = HEALTH_DEFAULTS["loss_max"] if loss_max is None else loss_max
    explode_ratio = HEALTH_DEFAULTS["explode_ratio"] if explode_ratio is None else explode_ratio
    losses = parse_losses(text, pattern)
    values = [v for _, v in losses]
    problems: list[tuple[int, str, str]] = []
    found = judge_losses(losses, loss_max, explode_ratio)
    if found:
        problems.append((found[2], found[0], found[1]))
    if rules:
        from remoteops.plugins import run_health_rules

        for step, (lineno, loss) in enumerate(losses, 1):
            ruled = run_health_rules(rules, step, loss)
            if ruled:
                problems.append((lineno, ruled[0], f"{ruled[1]} (log line {lineno})"))
                break
    for regex, reason in ((_OOM, "oom"), (_CUDA, "cuda")):
        m = regex.search(text)
        if m:
            line = _line_of(text, m.start())
            problems.append((line, reason, text.splitlines()[line - 1].strip()[:300]))
    m = _TRACEBACK.search(text)
    if m:
        line = _line_of(text, m.start())
        tail = [ln for ln in text[m.start():].splitlines() if ln and not ln.startswith(" ")]
        last = tail[-1].strip() if len(tail) > 1 else "traceback"
        # An OOM/CUDA traceback keeps its more precise class.
        if not any(r in ("oom", "cuda") for _, r, _ in problems):
            problems.append((line, "traceback", last[:300]))
    verdict = Verdict(True, losses=values, last_loss=values[-1] if values else None)
    if problems:
        problems.sort(key=lambda p: (p[0], p[1] != "nan"))
        line, reason, message = problems[0]
        verdict.ok, verdict.reason, verdict.message, verdict.line = False, reason, message, line
    return verdict


def check_log(log: str | Path, heartbeat: str | Path | None = None,
              pattern: str | None = None, loss_max: float | None = None,
              explode_ratio: float | None = None, stale_seconds: float | None = None,
              now: float | None = None, max_bytes: int = 4 << 20) -> Verdict:
    """Check a log file (its last ``max_bytes``) and optionally a heartbeat file."""
    log = Path(log)
    now = time.time() if now is None else now
    stale = HEALTH_DEFAULTS["stale_seconds"] if stale_seconds is None else stale_seconds
    if not log.exists():
        return Verdict(False, "missing", f"log {log} does not exist")
    size = log.stat().st_size
    with open(log, "rb") as fh:
        if size > max_bytes:
            fh.seek(size - max_bytes)
        text = fh.read().decode("utf-8", errors="replace")
    verdict = check_text(text, pattern, loss_max, explode_ratio)
    latest = log.stat().st_mtime
    if heartbeat is not None and Path(heartbeat).exists():
        hb = Path(heartbeat)
        latest = max(latest, hb.stat().st_mtime)
        try:
            latest = max(latest, float(json.loads(hb.read_text(encoding="utf-8"))["time"]))
        except (ValueError, KeyError, TypeError):
            pass
    verdict.age_s = round(now - latest, 1)
    if verdict.ok and verdict.age_s > stale:
        verdict.ok, verdict.reason = False, "stale"
        verdict.message = (f"no log output or heartbeat for {verdict.age_s:.0f} s "
                           f"(limit {stale:g} s): the process may be dead or hung")
    return verdict
