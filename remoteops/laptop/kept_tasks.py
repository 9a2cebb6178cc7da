"""The ``connections`` task (added to ``laptop.tasks.make_namespace``): the kept connections
(``laptop/kept``) of this user, listed or closed."""

from __future__ import annotations

import json as _json
import time

from invoke import task

from remoteops.laptop.task_wrap import friendly


@task(help={"close": "close this project's (or with --all every one); the next command "
                     "logs in again",
            "all": "every project's kept connections, not only this one's",
            "host": "only the kept connections to this host (as given to --host)",
            "json": "print JSON"})
@friendly
def connections(c, close=False, all=False, host=None, json=False):
    """List the kept connections ([ssh] persist) that make redeploys skip the login."""
    from remoteops.common.config import load_settings
    from remoteops.laptop.kept import close as close_one, running

    here = str(load_settings().project_dir)
    rows = [r for r in running() if (host is None or r.get("host") == host)
            and (all or r.get("project") == here)]
    if close:
        for row in rows:
            row["closed"] = close_one(row)
    if json:
        print(_json.dumps({"connections": rows}, indent=2))
        return
    if not rows:
        print("no kept connections" + (f" to {host}" if host else "") +
              ("" if all else " for this project (--all: every project's)"))
        return
    now = time.time()
    for row in rows:
        state = ("closed" if row["closed"] else "still open (see its log)") \
            if close else f"up {_age(now - float(row['started']))}"
        print(f"{row['target']:<24} {row.get('via', '?'):<9} pid {row['pid']:<8} {state:<10} "
              f"{row['project']}  log: {row['log']}")


def _age(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


__all__ = ["connections"]
