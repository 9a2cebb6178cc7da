"""A deploy in one request: read the manifest delta and the changed files from stdin, apply.

The laptop sends this when its record of the server is current (see
``remoteops.common.deploy_wire`` for the format). The manifest is rebuilt from
``current.json`` and checked against the sha256 the laptop sent; the files are
written under ``.remoteops/incoming/``, checked against their sha256, and only
after the laptop's ``GO`` handed to the usual apply (``Project.apply`` with
``expect_base``: lock, base and disk checks, staging with every file's hash
verified, backup, journal). Anything that does not match changes nothing and
answers ``base_differs``: the laptop then plans against this server as before.
A connection cut before ``GO`` leaves the server as it was.

A full deploy sends the whole manifest and the bundle's tar as it is written
(``receive_chunked``): what arrived is kept under a name carrying the content id,
so after a cut the next plan reports it (``stream_parts``) and the upload resumes.
A delta the server planned (``deploy-plan``) comes the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable

from remoteops.common.deploy_wire import CONTROL, GO, MARK, MAX_HEADER, rebuild
from remoteops.common.errors import RemoteOpsError
from remoteops.common.files import CHUNK, write_all
from remoteops.common.manifest import BundleError, Manifest
from remoteops.server.apply import Project

NO_PAYLOAD = ("the deploy's data did not arrive on stdin; something in the login shell "
              "(~/.bashrc) reads stdin: guard it with [[ $- == *i* ]]")


class Input:
    """stdin, read exactly. Given the raw stdin (an unbuffered ``FileIO``, as the wire entry
    passes it), a file's bytes can go straight from it to a file (``into_file``: by the
    kernel, ``splice``, where stdin is a pipe)."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.buffer = stream, b""
        self.fd = stream.fileno() if isinstance(stream, io.FileIO) and \
            hasattr(os, "splice") else None

    def _more(self, n: int) -> bytes:
        read1 = getattr(self.stream, "read1", None)
        return read1(n) if read1 is not None else self.stream.read(n)

    def exactly(self, n: int) -> bytes:
        """``n`` bytes, or fewer when the input ends first."""
        parts, left = [self.buffer[:n]], n - len(self.buffer[:n])
        self.buffer = self.buffer[n:]
        while left > 0:
            chunk = self.stream.read(min(left, CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def into_file(self, fd: int, n: int) -> int:
        """The next ``n`` bytes written to ``fd`` (at its position); how many there were."""
        done = 0
        if self.buffer:
            head, self.buffer = self.buffer[:n], self.buffer[n:]
            write_all(fd, head)
            done = len(head)
        while done < n and self.fd is not None:
            try:
                moved = os.splice(self.fd, fd, min(n - done, CHUNK))
            except OSError:  # not a pipe (a socket, a file): read and write instead
                self.fd = None
                break
            if not moved:
                return done
            done += moved
        while done < n:
            chunk = self.stream.read(min(n - done, CHUNK))
            if not chunk:
                break
            write_all(fd, chunk)
            done += len(chunk)
        return done

    def line(self, limit: int = 4096) -> bytes:
        while b"\n" not in self.buffer and len(self.buffer) < limit:
            chunk = self._more(65536)
            if not chunk:
                break
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def header(self) -> dict:
        """The header after ``MARK``, which must come first: only the laptop writes to
        this stdin, so anything else means a login shell read part of it (and waiting
        for the rest would wait forever)."""
        while len(self.buffer) < len(MARK):
            chunk = self._more(65536)
            if not chunk:
                break
            self.buffer += chunk
        if not self.buffer:
            raise RemoteOpsError("no deploy arrived (the laptop stopped before sending it); "
                                 "nothing was changed.")
        if not self.buffer.startswith(MARK):
            raise RemoteOpsError(NO_PAYLOAD)
        self.buffer = self.buffer[len(MARK):]
        size = int(self.line() or 0)
        if not 0 < size <= MAX_HEADER:
            raise RemoteOpsError(CUT)
        body = self.exactly(size)
        if len(body) != size:
            raise RemoteOpsError(CUT)
        return json.loads(body.decode("utf-8"))


CUT = ("the connection was cut while the deploy was sent; nothing was changed: run the "
       "deploy again.")


def receive(src: Input, dest: Path, size: int, sha256: str) -> None:
    """The ``size`` bytes that follow into ``dest``, their sha256 checked. A short or
    damaged stream removes what arrived and raises."""
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    got = 0
    try:
        with open(part, "wb") as out:
            while got < size:
                chunk = src.exactly(min(CHUNK, size - got))
                if not chunk:
                    raise RemoteOpsError(f"the connection was cut after {got} of {size} bytes "
                                         "of the deploy; nothing was changed: run it again.")
                out.write(chunk)
                h.update(chunk)
                got += len(chunk)
        if h.hexdigest() != sha256:
            raise BundleError("the files sent do not match their sha256 (damaged in transit); "
                              "nothing was changed: run the deploy again.")
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def receive_chunked(src: Input, dest: Path, offset: int,
                    on_open: Callable[[Path], Callable[[], None] | None] | None = None,
                    on_control: Callable[[bytes, Path], tuple[Path, Callable | None]]
                    | None = None) -> Path:
    """A tar sent while it was written (``chunk_frame`` pieces, then a trailer), appended
    to what ``dest``'s part file kept of an earlier, cut upload (``offset`` bytes). A cut
    keeps the part file: the next deploy resumes there. ``on_open(part)``: told once the
    part file is ready to grow (``early_stage`` reads it meanwhile); what it returns, if
    anything, is called after each piece is written. ``on_control(payload, part)``: a
    control frame (``deploy_wire.control_frame``: a first deploy's manifest) between two
    pieces; it renames the part file and returns the upload's new path and what to call
    after each piece from there on. Returns where the complete upload is."""
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if have < offset:
        raise RemoteOpsError("the upload to resume from is gone; run the deploy again.")
    # Starting over is a new file, never one truncated to 0 (nor opened with O_TRUNC): ext4
    # writes such a file to disk when it is closed (auto_da_alloc), and a full deploy wrote
    # its whole upload (~117 MB on the bench) for nothing, then waited for the discards when
    # it removed it.
    if not offset:
        part.unlink(missing_ok=True)
        have = 0
    got = offset
    with open(part, "r+b" if have else "wb", buffering=0) as out:
        if have > offset:  # what a cut upload kept beyond where this one resumes
            out.truncate(offset)
        out.seek(offset)
        grew = on_open(part) if on_open is not None else None
        fd = out.fileno()
        while True:
            length = src.exactly(8)
            size = int.from_bytes(length, "big") if len(length) == 8 else -1
            if size == 0:
                break
            if size > 0 and size & CONTROL:
                wanted = size & ~CONTROL  # a message, read whole when it is one expected
                payload = src.exactly(wanted) if on_control and wanted <= MAX_HEADER else None
                if payload is None or len(payload) != wanted:
                    raise RemoteOpsError("the deploy's stream holds a frame this agent does "
                                         "not expect; nothing was changed: run the deploy "
                                         "again.")
                dest, grew = on_control(payload, part)
                part = dest.with_name(dest.name + ".part")
                continue
            moved = src.into_file(fd, size) if size > 0 else 0
            got += moved
            if grew is not None:
                grew()
            if size < 0 or moved != size:
                raise RemoteOpsError(f"the connection was cut after {got} bytes of "
                                     "the bundle; nothing was changed: run the deploy again "
                                     "(it resumes there).")
    # No hash of the tar itself: SSH's MAC guards the bytes in transit, and staging checks
    # each member against the manifest and every file's sha256 (a resumed upload whose
    # first part is not what the laptop sent fails there, and is removed).
    trailer = json.loads(src.line() or b"{}")
    if trailer.get("size") != got:
        part.unlink(missing_ok=True)
        raise BundleError(f"the bundle sent is {got} bytes, not the {trailer.get('size')} the "
                          "laptop sent (damaged in transit); nothing was changed: run the "
                          "deploy again.")
    os.replace(part, dest)
    return dest


def stream_parts(project: Project, content_id: str) -> dict[str, int]:
    """Bytes kept of each cut upload for ``content_id``, by name (the next one resumes)."""
    prefix = f"stream-{content_id[:32]}-"
    folder = project.state / "incoming"
    if not folder.is_dir():
        return {}
    return {p.name[len(prefix):-len(".tar.zst.part")]: p.stat().st_size
            for p in folder.glob(f"{prefix}*.tar.zst.part")}


def whole_path(project: Project, content_id: str, name: str) -> Path:
    """Where an upload of ``content_id``'s bundle (``name``: what else its bytes depend on)
    is kept while it arrives (its part file: this + ``.part``)."""
    if not re.fullmatch(r"[a-z0-9-]{1,64}", name):
        raise RemoteOpsError(f"the upload's name {name!r} is not one remoteops sends.")
    return project.state / "incoming" / f"stream-{content_id[:32]}-{name}.tar.zst"


def wait_for_go(src: Input) -> None:
    """The laptop's go-ahead, sent last; without it nothing changes."""
    if src.exactly(len(GO)) != GO:
        raise RemoteOpsError("the laptop stopped before the deploy was to go ahead; nothing "
                             "was changed.")


def apply_streamed(root: str, stream: BinaryIO, say: Callable[[dict], None]) -> dict:
    """Read a one-request deploy from ``stream`` and apply it (see the module docstring).
    ``say`` prints an answer while the request goes on (the plan, when asked for)."""
    src = Input(stream)
    header = src.header()
    project = Project(root)
    if header.get("plan"):
        return _plan_then_apply(project, src, header, say)
    if header.get("first"):
        from remoteops.server.stream_first import first_then_apply

        return first_then_apply(project, src, header, say, _plan_then_apply, _apply_planned)
    if "manifest" in header:
        return _apply_planned(project, src, header)
    current = project.current()
    if current is None or current.content_id != header["base"]:
        return project._base_differs(
            "nothing is recorded as deployed there" if current is None else
            f"it has v{current.version} ({current.content_id[:12]}), not "
            f"{str(header['base'])[:12]}")
    try:
        new = rebuild(current, header)
    except BundleError as exc:
        return project._base_differs(str(exc))
    received = combined = None
    sent = header.get("delta")
    try:
        if sent:
            received = project.state / "incoming" / f"stream-{sent['sha256'][:32]}.tar.zst"
            receive(src, received, int(sent["size"]), sent["sha256"])
        patches = [(path, old, src.exactly(int(size))) for path, old, size in
                   header.get("patches") or []]
        wait_for_go(src)
        if patches:
            # (checked again under the lock) an interrupted change first, as apply says it
            reason = project._base_check(header["base"], header.get("agent"))
            if reason:
                return project._base_differs(reason)
            try:
                combined = patched_delta(project, new, patches, received)
            except PatchBaseDiffers as exc:
                return project._base_differs(str(exc))
        # the tar's sha256 was checked as it arrived; staging checks every file's
        return project.apply(new, combined or received, header["holder"], int(header["keep"]),
                             None, expect_base=header["base"], expect_agent=header.get("agent"))
    finally:
        for path in (received, combined):
            if path is not None:
                path.unlink(missing_ok=True)


class PatchBaseDiffers(RemoteOpsError):
    """The file a patch applies to is not the one the laptop's record says is here."""


def patched_delta(project: Project, new: Manifest, patches: list[tuple[str, str, bytes]],
                  received: Path | None) -> Path:
    """One tar of every changed file: the patched ones rebuilt from this disk's copies
    (each checked against the old and the new sha256), the others as received."""
    import tarfile

    import zstandard

    from remoteops.common.bundle_tar import iter_members
    from remoteops.common.deploy_wire import apply_patch
    from remoteops.common.files import atomic_output
    from remoteops.common.paths import safe_relpath
    from remoteops.common.tar_header import tarinfo

    wanted = new.file_map()
    out = project.state / "incoming" / f"stream-{new.content_id[:32]}-patched.tar.zst"
    with atomic_output(out) as raw, \
            zstandard.ZstdCompressor(level=1).stream_writer(raw, closefd=False) as zw, \
            tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        if received is not None:
            for member, fh in iter_members(received):
                if fh is not None:
                    tar.addfile(tarinfo(member.name, member.size, member.mode), fh)
        for path, old_sha, patch in patches:
            rel = safe_relpath(path, "the deploy's patches")
            entry = wanted.get(rel)
            if entry is None or entry.link is not None:
                raise BundleError(f"the deploy patches {rel}, which the manifest does not list "
                                  "as a file; nothing was changed.")
            try:
                here = project.root / rel
                old = here.read_bytes() if here.is_file() and not here.is_symlink() else None
            except OSError:
                old = None
            if old is None or hashlib.sha256(old).hexdigest() != old_sha:
                raise PatchBaseDiffers(f"1 file(s) there differ from what was deployed ({rel})")
            try:
                data = apply_patch(old, patch, entry.size)
            except zstandard.ZstdError:
                data = b""
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise BundleError(f"{rel} patched does not match its sha256 (damaged in "
                                  "transit); nothing was changed: run the deploy again.")
            tar.addfile(tarinfo(f"files/{rel}", len(data), entry.mode), io.BytesIO(data))
    return out


def _plan_then_apply(project: Project, src: Input, header: dict,
                     say: Callable[[dict], None]) -> dict:
    """Plan against this disk and say the plan; then the laptop says what follows (a tar
    of what the plan needs, or nothing: a no-op, a dry run, a declined deploy)."""
    new = Manifest.from_data(header["manifest"])
    plan = project.plan(new)
    plan["stream_parts"] = stream_parts(project, new.content_id)
    say(plan)
    line = src.line()
    follows = json.loads(line) if line else {}
    if follows.get("send") != "tar":
        return {"action": "apply", "noop": True, "skipped": True}
    return _apply_planned(project, src, {**header, "delta": follows}, plan["need"], new)


def _apply_planned(project: Project, src: Input, header: dict,
                   need: list[str] | None = None, new: Manifest | None = None,
                   upload: Path | None = None, arrival=None) -> dict:
    """The whole bundle, or a delta the server planned: received (resuming a cut upload), then
    applied as planned here. ``need``: this request's plan (its ``project.plan`` checked the
    manifest's paths); its files are staged while the upload arrives (``early_stage``) when
    it starts from the first byte. ``arrival``: the manifest and plan come in the upload's
    control frame (``stream_first``: the tar is received at ``upload`` until then)."""
    from remoteops.server.early_stage import EarlyStage

    if arrival is None:
        new = new or Manifest.from_data(header["manifest"])
        upload = whole_path(project, new.content_id, str(header["delta"].get("name", "whole")))
    delta = upload
    offset = int(header["delta"]["offset"])
    early: list[EarlyStage] = []

    def stage_early(part: Path) -> Callable[[], None] | None:
        if offset != 0 or not (need or arrival is not None):
            return None
        name = (new.content_id if arrival is None else "first") + f"-early-{os.getpid()}"
        early.append(EarlyStage(new, need, part, project.state / "staging" / name))
        return early[-1].grew

    def control(payload: bytes, part: Path) -> tuple[Path, Callable[[], None] | None]:
        dest = arrival.control(payload, part)
        for stager in early:  # staging since the first byte: for this manifest and plan
            stager.adopt(arrival.manifest, arrival.need)
        return dest, early[-1].grew if early else None

    try:
        try:
            delta = receive_chunked(src, delta, offset, stage_early,
                                    control if arrival is not None else None)
        except BaseException:
            for stager in early:
                stager.abandon()
            raise
        for stager in early:
            stager.complete()
        if arrival is not None:
            new, need = arrival.got(), arrival.need
        wait_for_go(src)
        result = project.apply(new, delta, header["holder"], int(header["keep"]), None,
                               early=early[0] if early else None, checked=need is not None)
        # the manifest the plan read (the laptop sent it before this request)
        (project.state / "incoming" / f"{new.content_id}.manifest.json").unlink(missing_ok=True)
        return result
    finally:
        delta.unlink(missing_ok=True)
        for stager in early:
            stager.discard()


__all__ = ["apply_streamed", "stream_parts", "Input", "receive", "receive_chunked",
           "whole_path"]
