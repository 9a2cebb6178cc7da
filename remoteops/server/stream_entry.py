"""The laptop's deploy request, ``python -m remoteops.agent deploy-stream --root R --json``,
started without click.

Every deploy starts a Python on the server, and a redeploy's own work there is tens of
milliseconds: the agent's start is most of it. click and the command groups are a good
part of that start, and this one command, always sent with exactly these arguments by the
laptop (``laptop/agent_stream.agent_command``), needs neither. Anything else (``--help``,
another order, a person typing it) goes to the click CLI, whose ``deploy-stream`` does the
same: the same answer between the markers, a ``RemoteOpsError`` as one ``error:`` line
with its exit code (``REMOTEOPS_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import os
import sys


def wire_args(argv: list[str]) -> str | None:
    """The root, when ``argv`` is exactly what the laptop sends (else None: use click)."""
    if len(argv) == 4 and argv[0] == "deploy-stream" and argv[1] == "--root" and \
            argv[3] == "--json" and argv[2] and not argv[2].startswith("-"):
        return argv[2]
    return None


def run(root: str) -> int:
    from remoteops.common.errors import RemoteOpsError
    from remoteops.common.wire import marked
    from remoteops.server.streamapply import apply_streamed

    def say(data: dict) -> None:  # an answer while the request goes on (the plan)
        sys.stdout.write(marked(data))
        sys.stdout.flush()

    from remoteops.common.files import grow_pipe

    grow_pipe(0)  # a deploy's bytes come through sshd's (or the resident's) pipe
    try:
        # unbuffered: what the tar sends goes from stdin to its file by the kernel (splice)
        result = apply_streamed(root, sys.stdin.buffer.raw, say)
    except RemoteOpsError as exc:
        if os.environ.get("REMOTEOPS_DEBUG"):
            import traceback

            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    sys.stdout.write(marked(result))
    sys.stdout.flush()
    return 0


__all__ = ["wire_args", "run"]
