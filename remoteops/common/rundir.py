"""The run directory's files (pure Python, no torch): what the built-in trainer and
``remoteops.hooks`` (any trainer) write, and what the runner and ``invoke status`` read.

``outputs/training_sync/run_<UTC stamp>/`` holds ``metrics.csv``,
``summary.json`` (one entry per stage), signals ``<stage>.healthy|done|failed``
each with a ``<stage>.<signal>.json`` carrying the reason, a ``heartbeat``
(JSON: time, pid, stage, step) and ``checkpoints/<stage>/``.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from remoteops.common.clock import now_iso_precise, utc_stamp
from remoteops.common.files import write_atomic_text
from remoteops.common.runs import RUNS_DIR

SIGNALS = ("healthy", "done", "failed")
METRIC_FIELDS = ("stage", "step", "epoch", "loss", "eval_loss", "lr", "grad_norm",
                 "tokens_per_s", "time", "samples", "seen")  # live data: set size, records trained


def new_run_dir(project_dir: Path) -> Path:
    base = project_dir / RUNS_DIR
    path = base / f"run_{utc_stamp()}"
    n = 1
    while path.exists():
        n += 1
        path = base / f"run_{utc_stamp()}_{n}"
    return path


def run_dirs(project_dir: Path) -> list[Path]:
    """Every run directory of the project, oldest first."""
    base = project_dir / RUNS_DIR
    if not base.is_dir():
        return []
    return sorted((p for p in base.iterdir() if p.is_dir() and p.name.startswith("run_")),
                  key=lambda p: (p.stat().st_mtime, p.name))


class RunDir:
    """One run directory, seen from one stage."""

    def __init__(self, path: Path, stage: str):
        self.path = Path(path)
        self.stage = stage
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics_lock = threading.Lock()
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self.step = 0

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints" / self.stage

    # -- signals ---------------------------------------------------------------
    def signal(self, name: str, reason: str = "", **details: Any) -> None:
        """Write ``<stage>.<name>`` and its JSON; a new done/failed clears the other."""
        assert name in SIGNALS, name
        info = {"stage": self.stage, "signal": name, "reason": reason,
                "time": now_iso_precise(), "pid": os.getpid(), **details}
        write_atomic_text(self.path / f"{self.stage}.{name}.json", json.dumps(info, indent=2) + "\n")
        write_atomic_text(self.path / f"{self.stage}.{name}", (reason or name) + "\n")

    def clear_signals(self) -> None:
        for name in SIGNALS:
            for suffix in ("", ".json"):
                (self.path / f"{self.stage}.{name}{suffix}").unlink(missing_ok=True)

    def read_signal(self, name: str) -> dict[str, Any] | None:
        """The signal's JSON; None when absent or unreadable (not written through here)."""
        try:
            info = json.loads((self.path / f"{self.stage}.{name}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    # -- heartbeat -------------------------------------------------------------
    def beat(self) -> None:
        write_atomic_text(self.path / "heartbeat", json.dumps(
            {"time": time.time(), "iso": now_iso_precise(),
             "pid": os.getpid(), "stage": self.stage, "step": self.step}) + "\n")

    def start_heartbeat(self, every: float) -> None:
        self.beat()

        def loop() -> None:
            while not self._hb_stop.wait(every):
                try:
                    self.beat()
                except OSError:
                    pass

        self._hb_thread = threading.Thread(target=loop, name="remoteops-heartbeat", daemon=True)
        self._hb_thread.start()

    def stop_heartbeat(self) -> None:
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=2)
        self.beat()

    # -- metrics and summary ---------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        path = self.path / "metrics.csv"
        with self._metrics_lock:
            new = not path.exists()
            with open(path, "a", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow({"stage": self.stage, **row})

    def read_metrics(self) -> list[dict[str, str]]:
        path = self.path / "metrics.csv"
        if not path.exists():
            return []
        with open(path, newline="", encoding="utf-8") as fh:
            return [r for r in csv.DictReader(fh) if r.get("stage") == self.stage]

    def truncate_metrics_after(self, step: int) -> None:
        """Drop this stage's rows past ``step`` (a resumed run redoes those steps)."""
        path = self.path / "metrics.csv"
        if not path.exists():
            return
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        keep = [r for r in rows if r.get("stage") != self.stage or int(float(r["step"] or 0)) <= step]
        with self._metrics_lock, open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(keep)

    def update_summary(self, entry: dict[str, Any]) -> None:
        """Merge this stage's entry into ``summary.json``."""
        path = self.path / "summary.json"
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        data.setdefault("stages", {})[self.stage] = entry
        data["updated"] = now_iso_precise()
        write_atomic_text(path, json.dumps(data, indent=2, default=str) + "\n")
