"""Work on several hosts at once: one thread and one SSH connection per host, one verdict.

Modelled on Fabric's ``Group``: ``on_hosts`` runs ``work(host, target)`` for every host in
parallel and returns a ``GroupResult`` (host -> value or error) only after every host has
finished; one host's bad key, full disk or lost link never stops the others. ``report``
prints each host's result under its name (``--json``: one object keyed by host), then
fails once, naming the hosts that failed (``GroupFailed``, exit status 1).
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from remoteops.common.config import Settings
from remoteops.common.errors import RemoteOpsError

MAX_PARALLEL = 16  # hosts worked on at the same time; the rest wait for a free thread
_say_lock = threading.Lock()


class GroupFailed(RemoteOpsError):
    """Some hosts failed; the others finished (their results are printed)."""

    exit_code = 1


class HostFailed(RemoteOpsError):
    """A host's work ended in a verdict (a failed check, a failed run), not an exception;
    ``value`` is its result, printed like a good one."""

    exit_code = 1

    def __init__(self, message: str, value: Any = None):
        super().__init__(message)
        self.value = value


@dataclass
class HostResult:
    host: str
    value: Any = None
    error: str | None = None  # one line: what went wrong on this host

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class GroupResult:
    """Every host's result, in the order the hosts were named."""

    results: list[HostResult] = field(default_factory=list)

    @property
    def failed(self) -> list[HostResult]:
        return [r for r in self.results if not r.ok]

    def to_dict(self, as_dict: Callable[[Any], Any] = lambda v: v) -> dict:
        return {r.host: ({"ok": True, "result": as_dict(r.value)} if r.ok else
                         {"ok": False, "error": r.error,
                          **({"result": as_dict(r.value)} if r.value is not None else {})})
                for r in self.results}


def say(host: str, line: str) -> None:
    """One line of a host's progress while the hosts work, prefixed with its name."""
    with _say_lock:
        print(f"[{host}] {line}", flush=True)


def _one(host: str, work: Callable[[str], Any]) -> HostResult:
    try:
        return HostResult(host, work(host))
    except HostFailed as exc:
        return HostResult(host, getattr(exc, "value", None), str(exc))
    except RemoteOpsError as exc:
        return HostResult(host, None, str(exc))
    except Exception as exc:  # noqa: BLE001 - a host's bug must not hide the others' results
        if os.environ.get("REMOTEOPS_DEBUG"):
            traceback.print_exc()
        return HostResult(host, None, f"{type(exc).__name__}: {exc}")


def on_hosts(hosts: list[str], work: Callable[[str], Any]) -> GroupResult:
    """``work(host)`` on every host in parallel; every result, once all have finished.

    Daemon threads joined in short waits: Ctrl-C reaches this thread at once (the remote
    side goes on; a thread left behind ends with the program)."""
    results: dict[int, HostResult] = {}
    slots = threading.BoundedSemaphore(MAX_PARALLEL)

    def run(i: int, host: str) -> None:
        with slots:
            results[i] = _one(host, work)

    threads = [threading.Thread(target=run, args=(i, h), name=f"host-{h}", daemon=True)
               for i, h in enumerate(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    return GroupResult([results[i] for i in range(len(hosts))])


def with_target(settings: Settings, trust_host: bool,
                work: Callable[[str, Any], Any]) -> Callable[[str], Any]:
    """``work(host, target)`` with the host's own target, opened and closed around it."""
    from remoteops.laptop.targets import open_target

    def run(host: str) -> Any:
        with open_target(settings, host, trust_host=trust_host) as target:
            return work(host, target)

    return run


def report(group: GroupResult, show: Callable[[str, Any], None], as_json: bool,
           what: str, as_dict: Callable[[Any], Any] = lambda v: v) -> None:
    """Print each host's result under its name, then fail once naming the failed hosts."""
    if as_json:
        from remoteops.tables import print_json

        print_json(group.to_dict(as_dict))
    else:
        for r in group.results:
            print(f"== {r.host}: {'ok' if r.ok else 'FAILED'}", flush=True)
            if r.value is not None:
                show(r.host, r.value)
            if not r.ok:
                print(f"error: {r.error}", flush=True)
            print(flush=True)
    sys.stdout.flush()
    raise_if_failed(group, what)


def raise_if_failed(group: GroupResult, what: str) -> None:
    failed = group.failed
    if failed:
        names = ", ".join(r.host for r in failed)
        others = "the others finished; " if len(failed) < len(group.results) else ""
        raise GroupFailed(f"{what} failed on {len(failed)} of {len(group.results)} hosts: "
                          f"{names} ({others}see each host's result above).")


__all__ = ["GroupFailed", "HostFailed", "HostResult", "GroupResult", "on_hosts", "with_target",
           "report", "raise_if_failed", "say", "MAX_PARALLEL"]
