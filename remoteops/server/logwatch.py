"""Health from a command stage's output, for trainers that do not run in-process (pure Python).

``LogWatch`` is fed the output as it arrives (tqdm's ``\\r`` updates included), reads each
line's numbers with ``remoteops.server.logformats`` (HF/LLaMA-Factory/axolotl dicts,
torchtune, Lightning bars, plain ``step N loss X``, or the project's ``loss_pattern``)
and asks ``remoteops.common.health.HealthJudge`` about each step, as the built-in trainer
does: a NaN/inf loss or gradient norm is ``nan``, an exploding loss ``divergence``, a
``health_rules`` plugin's reason its own. That is what stops a running command.

A traceback, "out of memory" or a CUDA error in the output of a process that keeps running
is only a warning (a handled exception, a logging error, a batch-size finder). When the
process exits, a non-zero exit is classified from the end of its output: ``oom``, ``cuda``,
or ``traceback`` with the exception's line; with none of them the runner says the process
died. ``check_text`` and ``check_log`` judge a whole text or file at once.
"""

from __future__ import annotations

import codecs
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from remoteops.common.defaults import HEALTH_DEFAULTS
from remoteops.common.health import HealthJudge
from remoteops.server.logformats import parse_line

_OOM = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.I)
_CUDA = re.compile(r"CUDA error|cudaError|CUDNN_STATUS|NCCL error|device-side assert|"
                   r"illegal memory access|CUDA driver|no kernel image", re.I)
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):")
CRASH_TAIL = 50  # a crash explains an exit only when it is among the output's last lines


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
    warnings: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["losses"] = d["losses"][-20:]
        return d


class LogWatch:
    """One attempt's output, judged line by line as it arrives."""

    def __init__(self, pattern: str | None = None, loss_max: float | None = None,
                 explode_ratio: float | None = None, rules: list | None = None,
                 overflow_steps: int | None = None):
        self.pattern = re.compile(pattern, re.I) if pattern else None
        self.judge = HealthJudge(
            HEALTH_DEFAULTS["loss_max"] if loss_max is None else loss_max,
            HEALTH_DEFAULTS["explode_ratio"] if explode_ratio is None else explode_ratio,
            check_lr=False,  # a schedule's logged lr reaches 0 at its end: not a stuck run
            rules=rules, overflow_steps=HEALTH_DEFAULTS["grad_overflow_steps"]
            if overflow_steps is None else overflow_steps)
        self.line = 0        # physical lines completed so far
        self._rest = ""      # text after the last line break
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.losses: list[float] = []
        self.formats: dict[str, int] = {}
        self.problem: tuple[int, str, str] | None = None
        self.crashes: list[tuple[int, int, str, str]] = []  # (first, last line, class, text)
        self._in_traceback: int | None = None
        self._steps = 0

    # -- feeding ---------------------------------------------------------------------
    def feed_bytes(self, data: bytes) -> None:
        self.feed(self._decoder.decode(data))

    def feed(self, text: str) -> None:
        text = self._rest + text
        *lines, self._rest = text.split("\n")
        for line in lines:
            self.line += 1
            for part in line.split("\r"):
                self._segment(part)
        # a tqdm bar redraws with \r and no \n for a whole epoch: read its finished parts
        if "\r" in self._rest:
            *parts, self._rest = self._rest.split("\r")
            for part in parts:
                self._segment(part, self.line + 1)

    def close(self) -> None:
        """The output has ended: read the last, unterminated line."""
        rest, self._rest = self._rest + self._decoder.decode(b"", final=True), ""
        if rest:
            self.line += 1
            for part in rest.split("\r"):
                self._segment(part)

    def _segment(self, text: str, line: int | None = None) -> None:
        line = self.line if line is None else line
        if not text.strip():
            return
        self._crash_markers(text, line)
        for record in parse_line(text, self.pattern):
            self.formats[record.format] = self.formats.get(record.format, 0) + 1
            self._steps += 1
            if record.loss is not None:
                self.losses.append(record.loss)
            if self.problem is not None:
                continue
            step = record.step if record.step is not None else self._steps
            found = self.judge.judge(step, record.loss, record.grad_norm, record.lr)
            if found:
                self.problem = (line, found[0], f"{found[1]} (log line {line})")

    def _crash_markers(self, text: str, line: int) -> None:
        if _TRACEBACK.match(text):
            self._in_traceback = line
            return
        if self._in_traceback is not None:
            if text[:1].isspace():
                return  # a frame or its source line
            start, self._in_traceback = self._in_traceback, None
            kind = "oom" if _OOM.search(text) else "cuda" if _CUDA.search(text) else "traceback"
            self.crashes.append((start, line, kind, text.strip()[:300]))
            return
        for regex, kind in ((_OOM, "oom"), (_CUDA, "cuda")):
            if regex.search(text):
                self.crashes.append((line, line, kind, text.strip()[:300]))
                return

    # -- the verdict -----------------------------------------------------------------
    def verdict(self, exit_code: int | None = None) -> Verdict:
        """While running (``exit_code`` None) only a loss problem fails; after a non-zero
        exit the crash at the end of the output names the class."""
        verdict = Verdict(True, losses=list(self.losses),
                          last_loss=self.losses[-1] if self.losses else None,
                          formats=dict(self.formats))
        crash = None
        if exit_code not in (None, 0) and self.crashes:
            last = self.crashes[-1]
            if self.line - last[1] < CRASH_TAIL:
                crash = last
        for entry in self.crashes:
            line, _, kind, text = entry
            if entry != crash:
                what = "a traceback" if kind == "traceback" else f"'{kind}' text"
                verdict.warnings.append(f"log line {line}: {what} while the process kept "
                                        f"running: {text[:200]}")
        if self.problem is not None:
            verdict.line, verdict.reason, verdict.message = self.problem
            verdict.ok = False
        elif crash is not None:
            verdict.ok, verdict.line, verdict.reason = False, crash[0], crash[2]
            verdict.message = f"{crash[3]} (log line {crash[0]})"
        return verdict


def check_text(text: str, pattern: str | None = None, loss_max: float | None = None,
               explode_ratio: float | None = None, rules: list | None = None,
               exit_code: int | None = None) -> Verdict:
    """Judge a whole output; ``exit_code`` as the process ended (None: still running)."""
    watch = LogWatch(pattern, loss_max, explode_ratio, rules)
    watch.feed(text)
    watch.close()
    return watch.verdict(exit_code)


def parse_losses(text: str, pattern: str | None = None) -> list[tuple[int, float]]:
    """``(line number, loss)`` for every training loss in the text (NaN and inf included)."""
    compiled = re.compile(pattern, re.I) if pattern else None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for part in line.split("\r"):
            out += [(lineno, r.loss) for r in parse_line(part, compiled) if r.loss is not None]
    return out


def check_log(log: str | Path, heartbeat: str | Path | None = None,
              pattern: str | None = None, loss_max: float | None = None,
              explode_ratio: float | None = None, stale_seconds: float | None = None,
              now: float | None = None, max_bytes: int = 4 << 20,
              exit_code: int | None = None) -> Verdict:
    """Check a log file (its last ``max_bytes``) and optionally a heartbeat file: ``stale``
    when neither moved for ``stale_seconds``."""
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
    verdict = check_text(text, pattern, loss_max, explode_ratio, exit_code=exit_code)
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


__all__ = ["LogWatch", "Verdict", "check_text", "check_log", "parse_losses"]
