"""A first deploy's tar, taken before its manifest: the upload starts while the laptop hashes.

A deploy without a record plans on the server (``streamapply._plan_then_apply``), and
the plan needs the manifest, which needs every file hashed: on the bench the upload
could only start ~0.3 s after the tar did. So a deploy without a record opens its
request with a probe (``header["first"]``), answered at once: is this root empty
(nothing deployed, nothing pending, no file in it), and how much disk is free. Then:

- the laptop writes a first bundle (compressed while it hashes) and the root is empty:
  every file will be needed whatever the hashes say, so it sends ``{"send": "tar"}`` and
  the tar as it is written, in chunk frames. Its files are staged from the first byte
  (``early_stage``, each file's sha256 kept); the manifest follows in a control frame
  (``deploy_wire.control_frame``) as soon as the laptop has it. From there on it is the
  planned deploy: the plan is made and said, the part file takes the name that carries
  the content id (a cut upload resumes there, through a planned request), and before
  anything is used every staged file is checked against the manifest
  (``EarlyStage.result``); nothing changes without the laptop's ``GO``;
- else the laptop sends its manifest for a plan (``MARK`` and the header) and the request
  goes on as a planned one.

A part file cut before its manifest came carries no content id: nothing can resume it,
and every probe removes those ``STALE_PART_S`` old.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Callable

from remoteops import __version__
from remoteops.common.deploy_wire import MARK
from remoteops.common.errors import RemoteOpsError
from remoteops.common.manifest import Manifest
from remoteops.common.paths import RESERVED
from remoteops.server.apply import Project

# a part file of a first upload cut before its manifest came is removed this long after
# its last write (it carries no content id: no later request can resume it)
STALE_PART_S = 600


def why_not_empty(project: Project) -> str | None:
    """Why a first deploy cannot stream before its plan here (None: it can)."""
    current = project.current()
    if current is not None:
        return f"v{current.version} is deployed there"
    if project.pending_recovery() is not None:
        return "an interrupted change is pending there"
    if project.root.is_dir() and any(e.name != RESERVED for e in os.scandir(project.root)):
        return "the root holds files"
    return None


def _drop_stale_parts(project: Project) -> None:
    folder = project.state / "incoming"
    if not folder.is_dir():
        return
    for part in folder.glob("first-*.tar.zst.part"):
        try:
            if time.time() - part.stat().st_mtime > STALE_PART_S:
                part.unlink()
        except OSError:
            pass


def first_then_apply(project: Project, src, header: dict, say: Callable[[dict], None],
                     planned: Callable, apply_planned: Callable) -> dict:
    """The probe (``header["first"]``: the upload's ``name``), answered at once; then either
    the tar before its manifest (``{"send": "tar"}``), or the planned request (the
    request's next header is the manifest for a plan: ``planned``)."""
    _drop_stale_parts(project)
    reason = why_not_empty(project)
    if reason is None and header.get("agent") != __version__:
        reason = f"its agent is remoteops {__version__}"
    say({"empty": reason is None, "reason": reason, "agent_version": __version__,
         "free_bytes": project.free()})
    line = src.line()
    if line == MARK.rstrip(b"\n"):  # the manifest, for a plan
        src.buffer = MARK + src.buffer
        following = src.header()
        if not following.get("plan"):
            raise RemoteOpsError("the laptop sent no manifest to plan with; nothing was "
                                 "changed: run the deploy again.")
        return planned(project, src, following, say)
    if reason is not None or (json.loads(line) if line else {}).get("send") != "tar":
        raise RemoteOpsError("the laptop stopped before the deploy was sent; nothing was "
                             "changed.")
    name = str(header["first"].get("name") or "whole")
    token = f"first-{os.getpid()}-{secrets.token_hex(4)}"
    pending = project.state / "incoming" / f"{token}.tar.zst"
    arrival = Arrival(project, name, say)
    result = apply_planned(project, src, {**header, "delta": {"offset": 0, "name": name}},
                           upload=pending, arrival=arrival)
    return {**result, "sent_before_manifest": True}


class Arrival:
    """The manifest of a tar that is already arriving: read from its control frame, planned,
    and said; the part file then takes the name a resumed upload looks for."""

    def __init__(self, project: Project, name: str, say: Callable[[dict], None]):
        self.project, self.name, self.say = project, name, say
        self.manifest: Manifest | None = None
        self.need: list[str] | None = None

    def control(self, payload: bytes, part: Path) -> Path:
        """The manifest frame: plan, move ``part`` to its resumable name, say the plan;
        return the upload's final path (its part file is that name + ``.part``)."""
        from remoteops.server.streamapply import whole_path

        if self.manifest is not None:
            raise RemoteOpsError("the laptop sent an unexpected frame; nothing was changed: "
                                 "run the deploy again.")
        data = json.loads(payload.decode("utf-8"))
        manifest = Manifest.from_data(data["manifest"])
        plan = self.project.plan(manifest)
        plan["stream_parts"] = {}
        dest = whole_path(self.project, manifest.content_id, self.name)
        os.replace(part, dest.with_name(dest.name + ".part"))
        self.manifest, self.need = manifest, plan["need"]
        self.say(plan)
        return dest

    def got(self) -> Manifest:
        if self.manifest is None:
            raise RemoteOpsError("the upload ended without its manifest; nothing was changed: "
                                 "run the deploy again.")
        return self.manifest


__all__ = ["first_then_apply", "why_not_empty", "Arrival", "STALE_PART_S"]
