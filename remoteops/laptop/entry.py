"""The ``remoteops`` command's entry: ``deploy-bundle --host H --yes [--project-root R]
[--json]`` started without invoke, everything else through invoke (``laptop/main``).

The command a person runs most while iterating. invoke (and the collection of every
task) is a good part of a small redeploy's start on the laptop (about 60-80 ms of
0.4 s), and this exact form needs none of it: one host, no confirmation question, no
other flag. Anything else (``--help``, a group or several hosts, no ``--host``, another
flag, a prompt) goes to the full program, whose ``deploy-bundle`` does the same with the
same output, ``error:`` line and exit code (``REMOTEOPS_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import os
import sys

_FLAGS = {"--yes": "yes", "--json": "json"}
_VALUES = {"--host": "host", "--project-root": "project_root"}


def wire_args(argv: list[str]) -> dict | None:
    """The options, when ``argv`` is exactly that form (else None: the full program)."""
    if not argv or argv[0] != "deploy-bundle":
        return None
    opts: dict = {"yes": False, "json": False, "host": None, "project_root": None}
    args = list(argv[1:])
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if arg in _FLAGS:
            opts[_FLAGS[arg]] = True
        elif name in _VALUES and (eq or args):
            value = value if eq else args.pop(0)
            if not value or value.startswith("-"):
                return None
            opts[_VALUES[name]] = value
        else:
            return None
    host = opts["host"]
    if not opts["yes"] or not host or "," in host or host.strip().startswith("@"):
        return None
    return opts


def run(opts: dict) -> int:
    """The deploy-bundle task's body (``laptop/tasks.deploy_bundle``), its errors as one line."""
    from remoteops.common.config import load_settings
    from remoteops.common.errors import RemoteOpsError
    from remoteops.laptop.deploy import deploy
    from remoteops.laptop.render import print_deploy, upload_progress
    from remoteops.laptop.targets import open_target

    try:
        settings = load_settings(flags={"project_root": opts["project_root"],
                                        "non_interactive": None})
        with open_target(settings, opts["host"]) as target, \
                upload_progress(quiet=opts["json"]) as progress:
            outcome = deploy(settings, target, None, progress=progress, on_plan=None
                             if opts["json"] else _print_plan)
        print_deploy(outcome, opts["json"])
    except RemoteOpsError as exc:
        if os.environ.get("REMOTEOPS_DEBUG"):
            import traceback

            traceback.print_exc()
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def main() -> None:
    """The ``remoteops`` console script (and ``python -m remoteops``)."""
    opts = wire_args(sys.argv[1:])
    if opts is not None:
        sys.exit(run(opts))
    from remoteops.laptop.main import program

    program.run()


def _print_plan(outcome) -> None:
    from remoteops.laptop.render import print_plan

    print_plan(outcome)


__all__ = ["wire_args", "run", "main"]
