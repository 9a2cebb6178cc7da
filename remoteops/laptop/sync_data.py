"""``sync-data``: push new samples from a local source to a live dataset on the server,
exactly once and atomically, in batches.

One round: look at the source (``laptop/sync_source``: only complete, stable samples), drop
what the server already lists (its manifest, ``common/live_data``), pack the rest into
tars of at most ``[sync] batch_max`` samples, upload each with
``laptop/transfer.put_resumable`` (SFTP, resumable) and commit it with one agent call
(``data-receive``, ``server/data_receive``), which verifies every sample's sha256 before it
appears. Three SSH round trips per batch, however many samples it holds; the payloads and
answers cross the wire between markers, so a login shell's banner changes nothing.

Resuming needs no local state: the server's manifest says what arrived. A batch cut half
way is sent again from where its part file ends (same samples, same tar bytes); a batch
committed whose answer was lost is found in the manifest and skipped. ``--watch`` repeats
the round every ``poll_seconds``; a lost connection is reported and retried. Ctrl-C (or
SIGTERM) stops it between batches. ``.remoteops/sync-state.json`` keeps the last result and
the last error for ``--status``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from remoteops.common.clock import now_iso
from remoteops.common.config import Settings
from remoteops.common.errors import ConfigError, RemoteOpsError
from remoteops.common.files import write_atomic_json
from remoteops.common.sizes import human_size
from remoteops.common.target import AgentMissing, Target
from remoteops.laptop.sync_source import Look, Source, write_batch
from remoteops.laptop.transfer import put_resumable

Say = Callable[[str], None]
MAX_BATCH_BYTES = 64 << 20


class SyncStopped(RemoteOpsError):
    """A condition that waiting cannot fix: ``--watch`` stops on it instead of retrying."""


@dataclass
class Plan:
    """What ``sync-data`` works on, from ``[sync]`` and the flags."""

    source: Path
    fmt: str
    dest: str
    poll_seconds: float
    settle_seconds: float
    batch_max: int


def plan_from(settings: Settings, stage: str | None = None, source: str | None = None,
              fmt: str | None = None) -> Plan:
    dest = settings["sync.dest"]
    if stage:
        entry = settings["stages"].get(stage)
        if entry is None:
            raise ConfigError(f"there is no stage '{stage}' in remoteops.toml; name one of "
                              f"{', '.join(settings['stages']) or '(none defined)'}.")
        if not entry.get("dataset_live"):
            raise ConfigError(f"stage '{stage}' has no dataset_live; add dataset_live = "
                              f"\"data/live\" to [stages.{stage}].")
        dest = entry["dataset_live"]
    src = source or settings["sync.source"]
    if not src:
        raise ConfigError("no sync source is set; add source = \"samples\" (a folder or a "
                          ".jsonl file) to [sync] in remoteops.toml, or pass --source.")
    path = Path(src).expanduser()
    path = path if path.is_absolute() else settings.project_dir / path
    fmt = fmt or settings["sync.format"]
    if fmt not in ("dirs", "files", "jsonl"):
        raise ConfigError(f"--format is {fmt!r}; use dirs, files or jsonl.")
    return Plan(path, fmt, dest, float(settings["sync.poll_seconds"]),
                float(settings["sync.settle_seconds"]), int(settings["sync.batch_max"]))


@dataclass
class Round:
    sent: int = 0
    sent_bytes: int = 0
    batches: int = 0
    local: int = 0
    pending: int = 0
    server: int = 0
    lag: int = 0
    bad: list[str] = field(default_factory=list)
    seconds: float = 0.0


class DataSync:
    """Rounds of sync against one target; keeps what the server holds between rounds."""

    def __init__(self, settings: Settings, target: Target, plan: Plan, say: Say | None = None):
        self.settings, self.target, self.plan = settings, target, plan
        self.say = say or (lambda line: None)
        self.source = Source(plan.source, plan.fmt, plan.settle_seconds)
        self.server: dict[str, str] | None = None   # id -> sha256, once asked
        self.complete = None                         # the server's .complete marker
        self.work = settings.project_dir / ".remoteops" / "sync"
        self.stop = threading.Event()

    # -- the server -------------------------------------------------------------------------
    def _agent(self, *args: str, timeout: float | None = None) -> dict:
        try:
            return self.target.run_agent(*args, "--root", self.target.project_root,
                                         "--dest", self.plan.dest, timeout=timeout)
        except AgentMissing:
            raise SyncStopped(f"remoteops is not installed on {self.target.name}; run "
                                 "invoke deploy-bundle (it installs the agent) first.") from None

    def server_state(self) -> dict:
        state = self._agent("data-status", "--ids")
        self.server = dict(state.pop("ids"))
        self.complete = state["complete"]
        return state

    # -- one round --------------------------------------------------------------------------
    def look(self, wait: bool, assume_quiet: bool = False) -> Look:
        """A look at the source; ``wait``: look twice, ``settle_seconds`` apart, first."""
        look = self.source.look(assume_quiet)
        if wait and look.pending:
            self._sleep(max(self.plan.settle_seconds, 0.2))
            look = self.source.look()
        return look

    def round(self, wait: bool = False) -> Round:
        """Send every stable sample the server lacks; return what happened."""
        started = time.monotonic()
        if self.server is None:
            self.server_state()
        look = self.look(wait)
        todo = [s for s in look.stable if s.id not in self.server]
        if todo and self.complete:
            raise SyncStopped(f"{self.plan.dest} on {self.target.name} was marked complete "
                              f"(sync-data --done), so {len(todo)} new sample(s) were not sent; "
                              f"remove {self.plan.dest}/.complete there to reopen the set.")
        out = Round(local=len(look.stable), pending=look.pending, bad=look.bad)
        batch: list = []
        size = 0
        for sample in todo:
            if batch and (len(batch) >= self.plan.batch_max or
                          size + sample.bytes > MAX_BATCH_BYTES):
                self._send(batch, out)
                batch, size = [], 0
                if self.stop.is_set():
                    break
            batch.append(sample)
            size += sample.bytes
        if batch and not self.stop.is_set():
            self._send(batch, out)
        out.server = len(self.server)
        out.lag = len([s for s in look.stable if s.id not in self.server]) + look.pending
        out.seconds = time.monotonic() - started
        return out

    def _send(self, batch: list, out: Round) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            tar, digest = write_batch(batch, self.work)
        except OSError as exc:  # a sample changed under us: it is not stable after all
            raise RemoteOpsError(f"a sample changed while it was packed ({exc}); it is sent "
                                 "once it stops changing.") from None
        remote = f"{self.target.project_root.rstrip('/')}/.remoteops/incoming/{tar.name}"
        try:
            if self.target.size(remote) != tar.stat().st_size:  # not already up there
                out.sent_bytes += put_resumable(self.target, tar, remote)
            answer = self._agent("data-receive", "--tar", remote, "--sha256", digest,
                                 timeout=600)
        finally:
            tar.unlink(missing_ok=True)
        self.server.update(answer["ids"])
        for sid in answer["skipped"]:
            self.server.setdefault(sid, "")
        out.sent += len(answer["added"])
        out.batches += 1
        self.say(f"[{time.strftime('%H:%M:%S')}] sent {len(answer['added'])} sample(s)"
                 + (f" ({len(answer['skipped'])} already there)" if answer["skipped"] else "")
                 + f", {human_size(tar_bytes(batch))}; the server has {answer['samples']}")

    def _sleep(self, seconds: float) -> None:
        self.stop.wait(seconds)

    # -- --watch ----------------------------------------------------------------------------
    def watch(self) -> Round:
        """Rounds until ``stop`` is set (Ctrl-C, SIGTERM); errors are reported and retried."""
        total, failures = Round(), 0
        # paramiko logs a reset connection at ERROR level; the loop reports it, in one line
        logging.getLogger("paramiko.transport").addHandler(logging.NullHandler())
        self.say(f"watching {self.plan.source} ({self.plan.fmt}) -> {self.target.name}:"
                 f"{self.plan.dest} every {self.plan.poll_seconds:g}s; Ctrl-C stops")
        while not self.stop.is_set():
            try:
                done = self.round()
            except SyncStopped as exc:
                record(self.settings, self.target, self.plan, error=str(exc))
                raise
            except RemoteOpsError as exc:
                failures += 1
                self.server = None  # ask again: a batch may have been committed unanswered
                self.target.close()
                record(self.settings, self.target, self.plan, error=str(exc))
                delay = min(self.plan.poll_seconds * failures, 30.0)
                self.say(f"[{time.strftime('%H:%M:%S')}] {exc} (retrying in {delay:g}s)")
                self._sleep(delay)
                continue
            failures = 0
            total.sent += done.sent
            total.sent_bytes += done.sent_bytes
            total.batches += done.batches
            total.local, total.server, total.lag = done.local, done.server, done.lag
            if done.batches:
                record(self.settings, self.target, self.plan, done)
            # a sample seen being written is looked at again once it can have settled
            self._sleep(min(self.plan.poll_seconds, max(self.plan.settle_seconds, 0.2))
                        if done.pending else self.plan.poll_seconds)
        return total


def tar_bytes(batch: list) -> int:
    return sum(s.bytes for s in batch)


def _state_path(settings: Settings) -> Path:
    return settings.project_dir / ".remoteops" / "sync-state.json"


def _key(target: Target, plan: Plan) -> str:
    return f"{target.name}:{plan.dest}"


def read_states(settings: Settings) -> dict:
    try:
        return json.loads(_state_path(settings).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}


def record(settings: Settings, target: Target, plan: Plan, done: Round | None = None,
           error: str | None = None) -> None:
    """Remember the last result and the last error for ``--status`` (best effort)."""
    states = read_states(settings)
    entry = states.setdefault(_key(target, plan), {})
    if error is not None:
        entry.update(last_error=error, last_error_at=now_iso())
    if done is not None:
        entry.update(last_sync_at=now_iso(), last_sent=done.sent, server=done.server,
                     local=done.local)
    try:
        write_atomic_json(_state_path(settings), states)
    except OSError:
        pass


def sync_data(settings: Settings, target: Target, plan: Plan, watch: bool = False,
              say: Say | None = None) -> Round:
    """``invoke sync-data``: one round (waiting once for samples being written), or
    ``watch`` until Ctrl-C / SIGTERM, which stop it between batches."""
    sync = DataSync(settings, target, plan, say)
    sync.source.check()
    if not watch:
        try:
            done = sync.round(wait=True)
        except RemoteOpsError as exc:
            record(settings, target, plan, error=str(exc))
            raise
        record(settings, target, plan, done)
        return done
    previous = {}

    def stop(signum, frame):
        if sync.stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: now
        sync.stop.set()
        sync.say("stopping after this batch (Ctrl-C again to stop at once)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, stop)
    try:
        return sync.watch()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def sync_status(settings: Settings, target: Target, plan: Plan) -> dict:
    """Local count, server count, lag, last error (``sync-data --status``)."""
    sync = DataSync(settings, target, plan)
    look = sync.look(wait=False, assume_quiet=True)
    server = sync.server_state()
    waiting = [s for s in look.stable if s.id not in sync.server]
    # exactly once: a sample changed after it was sent is never sent again; say so
    changed = [s.id for s in look.stable
               if sync.server.get(s.id) and s.digest() != sync.server[s.id]]
    last = read_states(settings).get(_key(target, plan), {})
    oldest = min((s.mtime for s in waiting if s.mtime is not None), default=None)
    return {"host": target.name, "source": str(plan.source), "format": plan.fmt,
            "dest": plan.dest, "local": len(look.stable), "being_written": look.pending,
            "server": server["samples"], "server_last_at": server["last_at"],
            "lag": len(waiting) + look.pending, "not_samples": look.bad,
            "complete": server["complete"], "changed_after_sent": changed,
            "last_sync_at": last.get("last_sync_at"),
            "last_error": last.get("last_error"), "last_error_at": last.get("last_error_at"),
            "oldest_waiting_seconds": None if oldest is None
            else round(max(0.0, time.time() - oldest), 1)}


def mark_done(settings: Settings, target: Target, plan: Plan, say: Say | None = None) -> dict:
    """Send what is left, then write the completion marker the trainer waits for."""
    done = sync_data(settings, target, plan, watch=False, say=say)
    if done.pending:
        raise RemoteOpsError(f"{done.pending} sample(s) are still being written in "
                             f"{plan.source}; finish them, then run sync-data --done again.")
    sync = DataSync(settings, target, plan)
    return sync._agent("data-done", "--expect", str(done.server))


__all__ = ["SyncStopped", "Plan", "plan_from", "DataSync", "Round", "sync_data", "sync_status", "mark_done"]
