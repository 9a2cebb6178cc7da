"""A deploy without a record in one request: the server plans it and applies it.

The ``deploy-stream`` request starts with the connection (``deploy_full.open_request``).
As soon as the manifest is known the laptop sends it, asking for the plan; the agent
plans against its disk (as ``deploy-plan`` does) and prints the plan while the
request stays open. The laptop shows it, asks for confirmation if it must, and
then sends what the plan needs (``deploy_full.send_tar``: the bundle as it is
written, or a delta) and the go-ahead, or says that nothing follows (a no-op, a
declined deploy). One command, no SFTP: the manifest travels on the request.

Whatever this agent cannot do (it is missing, another version, too old, or the
login shell eats its stdin) makes ``plan`` answer None and the deploy takes the
usual path: the manifest by SFTP, ``deploy-plan``, the agent installed if needed.
"""

from __future__ import annotations

from typing import Callable, Iterator

from remoteops.common.deploy_wire import framed_header
from remoteops.common.errors import RemoteCommandError
from remoteops.common.target import AgentMissing
from remoteops.laptop.agent_stream import AgentStream, not_streamable
from remoteops.laptop.build import Built
from remoteops.laptop.background import Background
from remoteops.laptop.deploy_full import close_request, request_header, send_tar


class Planned:
    """The request that plans on the server and then applies (see the module)."""

    def __init__(self, settings, target, opening: Background):
        self.settings, self.target, self.opening = settings, target, opening
        self.job: Background | None = None
        self.request: AgentStream | None = None
        self.sent = 0

    def ask(self, manifest) -> None:
        """Send the manifest and ask for the plan (in the background)."""
        data = framed_header(request_header(self.settings, manifest, plan=True))
        self.sent = len(data)

        def send() -> None:
            self.request = self.opening.result()
            self.request.send(data)

        self.job = Background(send)

    def plan(self, toolkit_version: str) -> dict | None:
        """The server's plan; None: this request cannot do it (the usual path runs)."""
        try:
            self.job.result()
            plan = self.request.answer()
        except AgentMissing:
            plan = None
        except RemoteCommandError as exc:
            if not not_streamable(exc) and "printed no answer" not in str(exc):
                raise
            plan = None
        if plan is None or plan.get("agent_version") != toolkit_version or "need" not in plan:
            self.cancel()
            return None
        return plan

    def skip(self) -> None:
        """Nothing follows the plan (a no-op or a dry run): the agent ends, changing nothing."""
        if self.request is not None:
            self.request.send(b'{"send": "none"}\n')
            try:
                self.request.finish()
            except RemoteCommandError:
                pass  # it changed nothing either way
            self.request = None

    def send(self, built: Built, chunks: Iterator[tuple], name: str, offset: int,
             progress: Callable[[int, int], None] | None, total: int) -> tuple[dict | None, int]:
        request, self.request = self.request, None
        return send_tar(self.settings, self.target, built, chunks, name, offset, progress,
                        total, request=request)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.settle()
        if self.request is not None:
            self.request.cancel()
            self.request = None
        else:
            close_request(self.opening)


__all__ = ["Planned"]
