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


def deploy_and_print(settings, host: str | None, bundle: str | None = None,
                     dry_run: bool = False, confirm=None, trust_host: bool = False,
                     as_json: bool = False) -> None:
    """The deploy-bundle task's body: deploy to one host, showing the plan and progress
    (JSON at the end with ``as_json``); shared by the task and the quick form below."""
    from remoteops.laptop.deploy import deploy
    from remoteops.laptop.render import print_deploy, print_plan, upload_progress
    from remoteops.laptop.targets import open_target

    with open_target(settings, host, trust_host=trust_host) as target, \
            upload_progress(quiet=as_json) as progress:
        # a login's threads end with the connection: its local tar waits for that; through
        # a kept connection (no such threads) it is written as it always was
        kept = getattr(target, "kept", None)
        outcome = deploy(settings, target, bundle, dry_run=dry_run, confirm=confirm,
                         progress=progress, on_plan=None if as_json else print_plan,
                         local_later=kept is None or not kept.ready())
    if outcome.finish_local is not None:  # the connection is closed: it may go to a child
        outcome.finish_local()
    print_deploy(outcome, as_json)


def run(opts: dict) -> int:
    """``deploy_and_print`` for the quick form, its errors as one line (as ``friendly``)."""
    from remoteops.common.config import load_settings
    from remoteops.common.errors import RemoteOpsError

    try:
        settings = load_settings(flags={"project_root": opts["project_root"],
                                        "non_interactive": None})
        deploy_and_print(settings, opts["host"], as_json=opts["json"])
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
        # a command of a second or two: the cyclic collector ran ~20 ms in it (mostly
        # during the imports), in line before the first byte could be sent
        import gc

        gc.disable()
        sys.exit(run(opts))
    from remoteops.laptop.main import program

    program.run()


__all__ = ["wire_args", "run", "main", "deploy_and_print"]
