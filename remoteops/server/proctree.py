"""Stop a whole process tree, found through /proc (Linux), without cgroups.

A stage's command may start its trainer as a child through a pipe, in its own
process group or session (``setsid``), or ignoring SIGTERM: killing one
process or one group misses those. Here a tree is every process whose parent
chain leads to a root (``setsid`` keeps the parent), and the runner is a child
subreaper, so a daemonising grandchild is re-parented to it, not to init.
Stopping freezes the tree first (SIGSTOP, rescanning until no new process
appears) so nothing can fork away or write more output, then asks each
process to end (SIGTERM + SIGCONT) and SIGKILLs what is left after a grace
period. Every kill checks the process's start time: a pid reused meanwhile is
never hit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Callable

from remoteops.common.locks import pid_alive, process_start, stat_fields

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    except (OSError, AttributeError):
        return False


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            out[int(name)] = int(stat_fields(name)[1])
        except (TypeError, IndexError, ValueError):
            continue
    return out


def descendants(roots: list[int]) -> dict[int, int | None]:
    """pid -> start time of the roots and every process below them (zombies included)."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, int | None] = {}
    todo = [r for r in roots if r in parents]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found[pid] = process_start(pid)
        todo += children.get(pid, [])
    return found


def children_of(pid: int) -> list[int]:
    return [p for p, parent in _parents().items() if parent == pid]


def _same(pid: int, start: int | None) -> bool:
    return pid_alive(pid) and (start is None or process_start(pid) == start)


def _signal(pid: int, start: int | None, sig: int) -> None:
    if _same(pid, start):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _reap(pids) -> None:
    """Collect our own dead children (direct or re-parented to us as subreaper)."""
    me = os.getpid()
    parents = _parents()
    for pid in pids:
        if parents.get(pid) == me:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def freeze(roots: list[int], keep: set[int] = frozenset()) -> dict[int, int | None]:
    """SIGSTOP the trees under ``roots`` until no new process appears; what was frozen."""
    frozen: dict[int, int | None] = {}
    for _ in range(100):
        found = {p: s for p, s in descendants(roots).items()
                 if p not in frozen and p not in keep}
        if not found:
            break
        for pid, start in found.items():
            _signal(pid, start, signal.SIGSTOP)
        frozen.update(found)
    return frozen


def stop_tree(roots: list[int], grace: float, on_frozen: Callable[[], None] | None = None,
              keep: set[int] = frozenset(), not_reaped: set[int] = frozenset()) -> list[int]:
    """Stop every process under ``roots`` (but ``keep``); the pids that had to be SIGKILLed.

    ``on_frozen`` runs while the whole tree is stopped: what was written before is all
    there is of the stage's output. ``not_reaped``: our children whose exit status someone
    else collects (a ``Popen``'s), left as zombies here.
    """
    frozen = freeze(roots, keep)
    if on_frozen is not None:
        on_frozen()
    for pid, start in frozen.items():
        _signal(pid, start, signal.SIGTERM)
        _signal(pid, start, signal.SIGCONT)
    deadline = time.monotonic() + max(0.0, grace)
    while True:
        _reap(set(frozen) - set(not_reaped))
        left = {p: s for p, s in frozen.items() if _same(p, s)}
        # new children forked while handling SIGTERM belong to the tree too
        left.update({p: s for p, s in descendants(list(left)).items() if p not in keep})
        if not left:
            return []
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    killed = []
    for _ in range(20):
        for pid, start in left.items():
            _signal(pid, start, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.05)
        _reap(set(left) - set(not_reaped))
        left = {p: s for p, s in left.items() if _same(p, s)}
        left.update({p: s for p, s in descendants(list(left)).items() if p not in keep})
        if not left:
            break
    return sorted(set(killed))


__all__ = ["become_subreaper", "descendants", "children_of", "freeze", "stop_tree"]
