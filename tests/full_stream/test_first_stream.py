"""A first deploy's tar sent before its manifest (``server/stream_first``, ``laptop/deploy_first``).

The agent runs as the server runs it (``python -m remoteops.agent deploy-stream``) on a
real root, fed what the laptop sends: the probe, the tar in chunk frames with the manifest
in a control frame between two of them, the trailer and the go-ahead; cut, reordered or
altered on purpose. And whole deploys through the local target and a real sshd. No mocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remoteops import __version__
from remoteops.common.bundle_tar import iter_members, write_tar
from remoteops.common.deploy_wire import GO, MARK, chunk_frame, control_frame, framed_header
from remoteops.common.manifest import Manifest
from remoteops.common.wire import BEGIN, END
from remoteops.server.stream_first import STALE_PART_S
from tests.full_stream.test_full_stream import _build, _deployed_exactly, _fill, _leftovers
from tests.test_deploy import ENV, make_project, tree

PIECE = 65536


def probe() -> bytes:
    return framed_header({"first": {"name": "whole-3"}, "base": None, "holder": "test", "keep": 5,
                    "agent": __version__})


def first_input(manifest: Manifest, data: bytes, manifest_at: int | None = None,
                upto: int | None = None, with_manifest: bool = True) -> bytes:
    """What the laptop sends for a first deploy to an empty root: the probe, ``send: tar``,
    the tar in chunk frames with the manifest's control frame before the piece at
    ``manifest_at`` (default: the middle), the end, the trailer and GO; cut at ``upto``."""
    frame = control_frame(json.dumps({"manifest": manifest.to_dict()}).encode())
    at = len(data) // 2 // PIECE * PIECE if manifest_at is None else manifest_at
    stdin = probe() + b'{"send":"tar"}\n'
    end = len(data) if upto is None else upto
    for i in range(0, end, PIECE):
        if i == at and with_manifest:
            stdin += frame
        stdin += chunk_frame(data[i:min(end, i + PIECE)])
    if upto is None:
        stdin += chunk_frame(b"") + json.dumps({"size": len(data), "offset": 0}).encode() \
            + b"\n" + GO
    return stdin


def _agent(root: Path, stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remoteops.agent", "deploy-stream", "--root",
                           str(root), "--json"], input=stdin, capture_output=True, timeout=120)


def _answers(res: subprocess.CompletedProcess) -> list[dict]:
    text = res.stdout.decode()
    return [json.loads(part.split(END)[0]) for part in text.split(BEGIN)[1:]]


@pytest.fixture
def built(cli, project) -> tuple[Manifest, bytes]:
    make_project(project)
    _fill(project, 11)
    manifest, tar = _build(cli, project)
    return manifest, tar.read_bytes()


def test_an_empty_root_takes_the_tar_before_its_manifest_and_ends_byte_identical(
        built, tmp_path):
    manifest, data = built
    root = tmp_path / "server"
    res = _agent(root, first_input(manifest, data))
    assert res.returncode == 0, res.stderr
    said, plan, applied = _answers(res)
    assert said["empty"] is True and said["free_bytes"] > 0
    assert len(plan["need"]) == len(manifest.files) and plan["stream_parts"] == {}
    assert applied["sent_before_manifest"] is True
    assert applied["staged_while_arriving"] == len(manifest.files)
    assert _deployed_exactly(root, manifest)
    assert _leftovers(root) == []
    # the manifest's own modes, not only the tar's
    for entry in manifest.files:
        assert os.stat(root / entry.path).st_mode & 0o7777 == entry.mode


@pytest.mark.parametrize("at", ["before the first piece", "after the last piece"])
def test_the_manifest_may_come_first_or_last(built, tmp_path, at):
    manifest, data = built
    root = tmp_path / "server"
    where = 0 if at == "before the first piece" else len(data) // PIECE * PIECE + PIECE
    stdin = first_input(manifest, data, manifest_at=where)
    if at == "after the last piece":  # between the last piece and the end frame
        frame = control_frame(json.dumps({"manifest": manifest.to_dict()}).encode())
        end = chunk_frame(b"") + json.dumps({"size": len(data), "offset": 0}).encode()
        stdin = stdin.replace(end, frame + end)
    res = _agent(root, stdin)
    assert res.returncode == 0, res.stderr
    assert _answers(res)[-1]["staged_while_arriving"] == len(manifest.files)
    assert _deployed_exactly(root, manifest)
    assert _leftovers(root) == []


@pytest.mark.parametrize("damage", ["altered bytes", "altered bytes in the large file",
                                    "an unlisted member", "a listed file left out"])
def test_a_tar_that_does_not_match_the_manifest_that_follows_it_changes_nothing(
        built, tmp_path, damage):
    """Staged before the manifest came, every file is checked against it before use."""
    manifest, data = built
    src = tmp_path / "src"
    members = []
    for member, fh in iter_members_bytes(data, tmp_path):
        path = src / member.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(fh)
        members.append((member.name, path, member.mode))
    if damage.startswith("altered bytes"):
        name = "files/data/weights.bin" if damage.endswith("large file") else \
            next(m[0] for m in members[len(members) // 2:] if m[0].startswith("files/src/"))
        path = next(m[1] for m in members if m[0] == name)
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
    elif damage == "an unlisted member":
        extra = src / "files" / "src" / "planted.py"
        extra.write_text("import os\n")
        members.insert(len(members) // 2, ("files/src/planted.py", extra, 0o644))
    else:
        members = [m for m in members if m[0] != "files/src/pkg0/m000.py"]
    bad = tmp_path / "bad.tar.zst"
    write_tar(bad, members)
    root = tmp_path / "server"
    res = _agent(root, first_input(manifest, bad.read_bytes()))
    assert res.returncode != 0
    err = res.stderr.decode()
    assert err.count("\n") == 1, err  # one line, no traceback
    expected = {"altered bytes": "does not match its sha256",
                "altered bytes in the large file": "weights.bin in the upload does not match",
                "an unlisted member": "which the manifest does not list as a file",
                "a listed file left out": "are not in the upload"}[damage]
    assert expected in err, err
    assert "nothing was changed" in err or damage == "a listed file left out"
    assert tree(root) == {}
    assert _leftovers(root) == []


def iter_members_bytes(data: bytes, tmp_path: Path):
    tar = tmp_path / "whole.tar.zst"
    tar.write_bytes(data)
    for member, fh in iter_members(tar):
        if fh is not None:
            yield member, fh.read()


def test_a_cut_after_the_manifest_keeps_a_part_the_planned_request_resumes(built, tmp_path):
    manifest, data = built
    root = tmp_path / "server"
    cut = len(data) * 2 // 3 // PIECE * PIECE
    res = _agent(root, first_input(manifest, data, manifest_at=PIECE, upto=cut))
    assert res.returncode != 0 and b"it resumes there" in res.stderr
    assert tree(root) == {}
    [part] = (root / ".remoteops" / "incoming").glob("*.part")
    assert part.name == f"stream-{manifest.content_id[:32]}-whole-3.tar.zst.part"
    assert part.read_bytes() == data[:cut]
    # the laptop's next deploy reuses its tar: a planned request, which resumes there
    header = framed_header({"plan": True, "manifest": manifest.to_dict(), "agent": __version__,
                      "holder": "test", "keep": 5})
    stdin = header + json.dumps({"send": "tar", "chunked": True, "offset": cut,
                                 "name": "whole-3"}).encode() + b"\n"
    stdin += b"".join(chunk_frame(data[i:i + PIECE]) for i in range(cut, len(data), PIECE))
    stdin += chunk_frame(b"") + json.dumps({"size": len(data), "offset": cut}).encode() \
        + b"\n" + GO
    res = _agent(root, stdin)
    assert res.returncode == 0, res.stderr
    plan, applied = _answers(res)
    assert plan["stream_parts"] == {"whole-3": cut}
    assert _deployed_exactly(root, manifest)
    assert _leftovers(root) == []


def test_a_cut_before_the_manifest_leaves_a_part_a_later_probe_removes_once_stale(built,
                                                                                  tmp_path):
    manifest, data = built
    root = tmp_path / "server"
    res = _agent(root, first_input(manifest, data, upto=4 * PIECE, manifest_at=8 * PIECE))
    assert res.returncode != 0
    assert tree(root) == {}
    [part] = (root / ".remoteops" / "incoming").glob("first-*.tar.zst.part")
    old = part.stat().st_mtime - STALE_PART_S - 10
    fresh = part.with_name("first-1-fresh.tar.zst.part")  # another deploy's, still arriving
    fresh.write_bytes(b"x")
    os.utime(part, (old, old))
    res = _agent(root, first_input(manifest, data))
    assert res.returncode == 0, res.stderr
    assert not part.exists() and fresh.exists()
    assert _deployed_exactly(root, manifest)


def test_the_tar_without_its_manifest_changes_nothing(built, tmp_path):
    manifest, data = built
    root = tmp_path / "server"
    res = _agent(root, first_input(manifest, data, with_manifest=False))
    assert res.returncode != 0
    err = res.stderr.decode()
    assert err.count("\n") == 1 and "ended without its manifest" in err, err
    assert tree(root) == {}
    assert _leftovers(root) == []


def test_a_root_that_is_not_empty_says_why_and_the_same_request_plans(built, cli, project,
                                                                     tmp_path):
    manifest, data = built
    root = tmp_path / "server"
    res = cli("deploy-bundle", "--host", "local", "--project-root", str(root), "--yes",
              env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    _fill(project, 12)
    manifest, tar = _build(cli, project)
    data = tar.read_bytes()
    stdin = probe() + framed_header({"plan": True, "manifest": manifest.to_dict(),
                               "agent": __version__, "holder": "test", "keep": 5})
    stdin += json.dumps({"send": "tar", "chunked": True, "offset": 0,
                         "name": "whole-3"}).encode() + b"\n"
    stdin += b"".join(chunk_frame(data[i:i + PIECE]) for i in range(0, len(data), PIECE))
    stdin += chunk_frame(b"") + json.dumps({"size": len(data), "offset": 0}).encode() \
        + b"\n" + GO
    res = _agent(root, stdin)
    assert res.returncode == 0, res.stderr
    said, plan, applied = _answers(res)
    assert said["empty"] is False and said["reason"] == "v1 is deployed there"
    assert "sent_before_manifest" not in applied
    assert _deployed_exactly(root, manifest)
    # a file someone put in an empty root: not empty either
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    res = _agent(other, probe())
    assert _answers(res)[0] == {"empty": False, "reason": "the root holds files",
                                "agent_version": __version__,
                                "free_bytes": _answers(res)[0]["free_bytes"]}
    assert (other / "notes.txt").read_text() == "mine\n"


def test_a_control_frame_in_a_planned_upload_is_refused(built, tmp_path):
    manifest, data = built
    root = tmp_path / "server"
    stdin = framed_header({"plan": True, "manifest": manifest.to_dict(), "agent": __version__,
                     "holder": "test", "keep": 5})
    stdin += json.dumps({"send": "tar", "chunked": True, "offset": 0,
                         "name": "whole-3"}).encode() + b"\n"
    stdin += chunk_frame(data[:PIECE]) + control_frame(b"{}") + chunk_frame(data[PIECE:])
    stdin += chunk_frame(b"") + json.dumps({"size": len(data), "offset": 0}).encode() \
        + b"\n" + GO
    res = _agent(root, stdin)
    assert res.returncode != 0
    err = res.stderr.decode()
    assert err.count("\n") == 1 and "does not expect" in err, err
    assert tree(root) == {}


def test_a_first_deploy_through_the_local_target_streams_before_its_manifest(cli, project,
                                                                           tmp_path):
    """The laptop's side: a first bundle to an empty root goes the new way; its redeploy
    to another empty root reuses the tar and plans first (no tar is being written)."""
    make_project(project)
    _fill(project, 13)
    root = tmp_path / "server"
    res = cli("deploy-bundle", "--host", "local", "--project-root", str(root), "--yes",
              "--json", env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["applied"]["sent_before_manifest"] is True
    manifest = Manifest.from_json(max((project / "bundles").glob("*.manifest.json"),
                                      key=os.path.getmtime).read_text())
    assert _deployed_exactly(root, manifest)
    assert out["sent_bytes"] > Path(out["bundle"]).stat().st_size  # the whole tar, once
    again = tmp_path / "again"
    res = cli("deploy-bundle", "--host", "local", "--project-root", str(again), "--yes",
              "--json", env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert "sent_before_manifest" not in out["applied"]
    assert _deployed_exactly(again, manifest)


def test_no_more_than_unnamed_max_of_the_tar_goes_before_its_manifest(project, tmp_path,
                                                                      monkeypatch):
    """Until the manifest comes the server's part file has no content id in its name, and a
    cut upload cannot be resumed: the laptop sends at most ``UNNAMED_MAX`` before it. The
    hashing is slowed (a slow disk) so that the tar is written well ahead of it; what is
    sent, and in which order, is recorded on the way out (the sends themselves are real)."""
    from remoteops.common.config import load_settings
    from remoteops.laptop import build, deploy_first
    from remoteops.laptop.agent_stream import AgentStream
    from remoteops.laptop.deploy import deploy as run_deploy
    from remoteops.laptop.targets import open_target

    make_project(project)
    _fill(project, 14)
    (project / "data" / "more.bin").write_bytes(os.urandom(5 << 20))  # six 1 MB pieces
    monkeypatch.chdir(project)
    monkeypatch.setenv("REMOTEOPS_REMOTE_PYTHON", sys.executable)
    monkeypatch.setattr(deploy_first, "UNNAMED_MAX", 1)
    real_hash = build.HashCache.sha256

    def slow_hash(self, *args):
        time.sleep(0.01)
        return real_hash(self, *args)

    monkeypatch.setattr(build.HashCache, "sha256", slow_hash)
    sent: list[str] = []
    real_send, real_file = AgentStream.send, AgentStream.send_file

    def send(self, data):
        top = len(data) >= 8 and data[0] & 0x80 and not data.startswith(MARK)
        sent.append("manifest" if top else "data")
        return real_send(self, data)

    def send_file(self, fh, start, length, prefix=b""):
        sent.append("piece")
        return real_file(self, fh, start, length, prefix)

    monkeypatch.setattr(AgentStream, "send", send)
    monkeypatch.setattr(AgentStream, "send_file", send_file)
    root = tmp_path / "server"
    settings = load_settings(flags={"project_root": str(root)})
    shown: list[tuple[int, int]] = []
    with open_target(settings, "local") as target:
        out = run_deploy(settings, target, progress=lambda done, total: shown.append(
            (done, total)))
    assert out.applied["sent_before_manifest"] is True
    # the progress a terminal shows: growing, to the whole tar
    assert shown and shown[-1][0] == out.bundle.tar_path.stat().st_size
    assert all(a[0] < b[0] and a[0] <= a[1] for a, b in zip(shown, shown[1:]))
    assert sent.count("manifest") == 1
    assert sent[:sent.index("manifest")].count("piece") == 1
    assert sent.count("piece") >= 6
    manifest = Manifest.from_json(out.bundle.manifest_path.read_text())
    assert _deployed_exactly(root, manifest)


def test_a_file_that_shrinks_while_its_tar_streams_stops_the_deploy_and_changes_nothing(
        project, tmp_path, monkeypatch):
    """The tar fails (the file shrank after its stat, before the tar read it) before the
    manifest is known: the sending stops, the request ends without its go-ahead, the
    deploy says why in the build's own words, and nothing waits for an answer that
    cannot come."""
    from remoteops.common.bundle_tar import BundleError
    from remoteops.common.config import load_settings
    from remoteops.laptop import build
    from remoteops.laptop.deploy import deploy as run_deploy
    from remoteops.laptop.targets import open_target

    make_project(project)
    _fill(project, 15)
    big = project / "data" / "more.bin"
    big.write_bytes(os.urandom(3 << 20))
    monkeypatch.chdir(project)
    monkeypatch.setenv("REMOTEOPS_REMOTE_PYTHON", sys.executable)
    real_hash = build.HashCache.sha256

    def shrink_then_hash(self, *args):  # slowly, so that the tar fails before the manifest
        if big.stat().st_size > 1 << 20:
            big.write_bytes(os.urandom(1 << 20))
        time.sleep(0.01)
        return real_hash(self, *args)

    monkeypatch.setattr(build.HashCache, "sha256", shrink_then_hash)
    root = tmp_path / "server"
    settings = load_settings(flags={"project_root": str(root)})
    started = time.monotonic()
    with open_target(settings, "local") as target:
        with pytest.raises(BundleError, match="more.bin shrank while the bundle was written"):
            run_deploy(settings, target)
    assert time.monotonic() - started < 60
    assert tree(root) == {}
    # the local agent was stopped (over SSH it ends when its input does); the next deploy
    # is whole and clears what the stopped one staged
    monkeypatch.setattr(build.HashCache, "sha256", real_hash)
    with open_target(settings, "local") as target:
        out = run_deploy(settings, target)
    manifest = Manifest.from_json(out.bundle.manifest_path.read_text())
    assert _deployed_exactly(root, manifest)
    assert [p for p in _leftovers(root) if not p.startswith("incoming/first-")] == []
