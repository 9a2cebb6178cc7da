"""What the runner watches while a stage's process runs: its output, its signals, its window.

- The output of a command stage goes through ``remoteops.server.logwatch.LogWatch``,
  read incrementally from the attempt's first byte (at most the last ``LOG_WINDOW``).
- The signals are the built-in trainer's files (``remoteops.common.rundir``), whoever
  writes them: a ``<stage>.failed`` that a command's own code wrote through
  ``remoteops.hooks`` stops the stage with its reason, even if the process goes on or
  exits 0. They are cleared before each attempt of a command stage (the built-in trainer
  clears its own).
- The health window (``health.window_seconds``, the first minutes of a stage): a stage
  is healthy once its process wrote ``<stage>.healthy`` or ran the whole window without a
  failure; the runner then writes ``<stage>.healthy`` if nobody did, and records
  ``health`` in the stage's entry of ``state.json``, which ``invoke status`` shows.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from remoteops.common.clock import now_iso
from remoteops.common.live_status import is_waiting
from remoteops.common.rundir import RunDir
from remoteops.server.logwatch import LogWatch, Verdict

LOG_WINDOW = 4 << 20  # judge at most the last 4 MiB of an attempt's output


class StageWatch:
    """One stage's watch, for each of its attempts in turn (``start`` begins one)."""

    def __init__(self, run_dir: Path, stage: dict, window_s: float,
                 log: dict | None = None, obey_failed: bool = True):
        self.signals = RunDir(run_dir, stage["name"])
        self.stage = stage
        self.window_s = window_s
        self.log_settings = log
        self.obey_failed = obey_failed
        self.changed = False  # the stage entry changed: the runner saves state.json

    @classmethod
    def for_stage(cls, settings, run_dir: Path, stage: dict, log: dict | None = None,
                  obey_failed: bool = True) -> "StageWatch":
        table = settings["stages"].get(stage["name"], {}) or {}
        window = (table.get("health") or {}).get("window_seconds",
                                                 settings["health.window_seconds"])
        return cls(run_dir, stage, float(window), log, obey_failed)

    # -- one attempt ------------------------------------------------------------------
    def start(self, log_path: Path, offset: int) -> None:
        self.stage.pop("health", None)
        self.log_path, self.pos, self.t0 = log_path, offset, time.monotonic()
        self.logwatch = None
        if self.log_settings is not None:  # a command stage: its signals start afresh
            self.signals.clear_signals()
            self.logwatch = LogWatch(**self.log_settings)
            self.logwatch.line = _lines_before(log_path, offset)  # line numbers of the file

    def poll(self) -> Verdict | None:
        """A failed verdict to stop the stage on, else None; updates the stage's health."""
        self.changed = False
        self._read()
        failed = self._failed()
        if failed is not None:
            return failed
        verdict = self.logwatch.verdict() if self.logwatch is not None else None
        if verdict is not None and not verdict.ok:
            return verdict
        self._health()
        return None

    def final(self, exit_code: int) -> Verdict | None:
        """The attempt's verdict once its process has exited (None: no log watched and no
        failed signal)."""
        self._read(final=True)
        verdict = self.logwatch.verdict(exit_code) if self.logwatch is not None else None
        for warning in verdict.warnings if verdict is not None else []:
            if warning not in self.stage["warnings"]:
                self.stage["warnings"].append(warning)
        failed = self._failed()
        if failed is not None:  # the training code's own word beats our reading of its log
            return failed
        if exit_code == 0 and (verdict is None or verdict.ok):
            self._health()  # a healthy signal written just before the end
        return verdict

    # -- parts ------------------------------------------------------------------------
    def _read(self, final: bool = False) -> None:
        """Feed the log watch what the attempt wrote since the last read."""
        if self.logwatch is None:
            return
        try:
            with open(self.log_path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                self.pos = max(self.pos, size - LOG_WINDOW)
                fh.seek(self.pos)
                data = fh.read(size - self.pos)
        except FileNotFoundError:
            data = b""
        self.pos += len(data)
        self.logwatch.feed_bytes(data)
        if final:
            self.logwatch.close()

    def _failed(self) -> Verdict | None:
        if not self.obey_failed:
            return None
        info = self.signals.read_signal("failed")
        if info is None:
            return None
        message = str(info.get("message") or "marked failed")
        if info.get("step") not in (None, -1) and f"step {info['step']}" not in message:
            message += f" at step {info['step']}"
        message += f" ({self.stage['name']}.failed)"
        return Verdict(False, str(info.get("reason") or "error"), message)

    def _health(self) -> None:
        if self.stage.get("health"):
            return
        signal = self.signals.read_signal("healthy")
        if signal is None and is_waiting(self.signals.path, self.stage["name"]):
            self.t0 = time.monotonic()  # waiting for live data proves nothing: no window yet
            return
        elapsed = time.monotonic() - self.t0
        if signal is not None:
            how = str(signal.get("reason") or "marked healthy")
            if signal.get("step") is not None:
                how += f" (step {signal['step']})"
        elif 0 < self.window_s <= elapsed:
            how = f"health window passed ({self.window_s:g} s without a failure)"
            self.signals.signal("healthy", how, window_seconds=self.window_s)
        else:
            return
        self.stage["health"] = {"status": "healthy", "how": how, "at": now_iso(),
                                "after_s": round(elapsed, 1)}
        self.changed = True


def _lines_before(path: Path, offset: int) -> int:
    """How many lines the log has before ``offset`` (the attempt's first byte)."""
    count = 0
    try:
        with open(path, "rb") as fh:
            while fh.tell() < offset:
                chunk = fh.read(min(1 << 20, offset - fh.tell()))
                if not chunk:
                    break
                count += chunk.count(b"\n")
    except FileNotFoundError:
        pass
    return count


__all__ = ["StageWatch", "LOG_WINDOW"]
