"""A full deploy streamed to ``deploy-stream`` as the laptop sends it (the server plans, the
whole bundle follows in chunk frames), with its files staged while they arrive.

The agent runs as the server runs it (``python -m remoteops.agent``), on a root a real
deploy made; the bundle is a real build; the stdin is what the laptop would send
(``common/deploy_wire``), cut or altered on purpose. No mocks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from remoteops.common.bundle_tar import SEGMENT_ALONE, iter_members, write_tar
from remoteops.common.deploy_wire import GO, MARK, chunk_frame
from remoteops.common.manifest import Manifest
from remoteops.common.wire import BEGIN, END
from tests.test_deploy import ENV, make_project, tree

HEADER_EXTRA = {"holder": "test", "keep": 5}
SMALL_FILES = 150


def _fill(project: Path, seed: int) -> None:
    """The demo project plus ``SMALL_FILES`` small files in folders and one large one."""
    rng = random.Random(seed)
    for i in range(SMALL_FILES):
        path = project / "src" / f"pkg{i // 25}" / f"m{i:03d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {seed}\n" + "".join(f"x{j} = {rng.random()}\n"
                                               for j in range(rng.randint(5, 60))))
    (project / "data" / "weights.bin").write_bytes(rng.randbytes(SEGMENT_ALONE + 300_000))


@pytest.fixture
def deployed(cli, project, tmp_path) -> Path:
    """A server root holding the project's first version (deployed through the local target)."""
    make_project(project)
    _fill(project, 1)
    root = tmp_path / "server"
    res = cli("deploy-bundle", "--host", "local", "--project-root", str(root), "--yes",
              env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return root


def _build(cli, project: Path) -> tuple[Manifest, Path]:
    res = cli("build-bundle", env=ENV)
    assert res.returncode == 0, res.stderr
    manifest_path = max((project / "bundles").glob("*.manifest.json"), key=os.path.getmtime)
    tar = manifest_path.with_name(manifest_path.name.replace(".manifest.json", ".tar.zst"))
    return Manifest.from_json(manifest_path.read_text()), tar


def stream_input(manifest: Manifest, data: bytes, offset: int = 0,
                 upto: int | None = None) -> bytes:
    """The request the laptop sends for a full deploy the server plans: the manifest, then
    (after the plan) the tar from ``offset`` in chunk frames; cut at ``upto`` if given."""
    header = json.dumps({"plan": True, "manifest": json.loads(manifest.to_json()),
                         "agent": manifest.toolkit_version, **HEADER_EXTRA}).encode()
    stdin = MARK + str(len(header)).encode() + b"\n" + header
    stdin += json.dumps({"send": "tar", "chunked": True, "offset": offset,
                         "name": "whole"}).encode() + b"\n"
    end = len(data) if upto is None else upto
    stdin += b"".join(chunk_frame(data[i:min(end, i + 65536)]) for i in range(offset, end, 65536))
    if upto is None:
        stdin += chunk_frame(b"") + json.dumps({
            "size": len(data), "offset": offset}).encode() + b"\n" + GO
    return stdin


def _deploy_stream(root: Path, manifest: Manifest, data: bytes, offset: int = 0,
                   upto: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remoteops.agent", "deploy-stream", "--root",
                           str(root), "--json"], input=stream_input(manifest, data, offset, upto),
                          capture_output=True, timeout=120)


def _answers(res: subprocess.CompletedProcess) -> list[dict]:
    text = res.stdout.decode()
    return [json.loads(part.split(END)[0]) for part in text.split(BEGIN)[1:]]


def _deployed_exactly(root: Path, manifest: Manifest) -> bool:
    files = {f.path: f.sha256 for f in manifest.files if f.link is None}
    return tree(root) == files


def _leftovers(root: Path) -> list[str]:
    state = root / ".remoteops"
    return sorted(p.relative_to(state).as_posix() for folder in ("incoming", "staging")
                  if (state / folder).is_dir() for p in (state / folder).rglob("*"))


def test_the_tar_holds_the_large_files_after_all_the_small_ones(deployed, project, cli):
    manifest, tar = _build(cli, project)
    sizes = [member.size for member, fh in iter_members(tar) if fh is not None]
    first_large = next(i for i, size in enumerate(sizes) if size >= SEGMENT_ALONE)
    assert first_large > SMALL_FILES  # data/weights.bin sorts before src/ by name
    assert all(size >= SEGMENT_ALONE for size in sizes[first_large:])
    assert len(sizes) == len(manifest.files) + 1  # and the toolkit wheel


def test_a_full_deploy_is_staged_while_it_arrives_and_ends_byte_identical(deployed, project,
                                                                          cli):
    _fill(project, 2)  # every small file and the large one change
    manifest, tar = _build(cli, project)
    res = _deploy_stream(deployed, manifest, tar.read_bytes())
    assert res.returncode == 0, res.stderr
    plan, applied = _answers(res)
    assert len(plan["need"]) == SMALL_FILES + 1
    assert applied["staged_while_arriving"] == SMALL_FILES + 1
    assert applied["overwritten"] == SMALL_FILES + 1
    assert _deployed_exactly(deployed, manifest)
    assert _leftovers(deployed) == []


@pytest.mark.parametrize("damage", ["altered bytes", "an unlisted member",
                                    "altered bytes in the large file"])
def test_a_tampered_member_in_the_middle_of_a_streamed_full_deploy_changes_nothing(
        deployed, project, cli, tmp_path, damage):
    before = tree(deployed)
    _fill(project, 3)
    manifest, tar = _build(cli, project)
    # the same tar with one small file in the middle altered (same size) or one added: its
    # tail sha256 is right (sent as the laptop would), only the files' own checks can tell
    members = [(m.name, tmp_path / "src" / m.name, m.mode)
               for m, fh in iter_members(tar) if fh is not None]
    for (name, path, _), (member, fh) in zip(members, ((m, f) for m, f in iter_members(tar)
                                                      if f is not None)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(fh.read())
    middle = members[len(members) // 2]
    assert middle[0].startswith("files/src/")
    if damage == "altered bytes in the large file":  # hashed beside its writing thread
        middle = next(m for m in members if m[0] == "files/data/weights.bin")
    if damage.startswith("altered bytes"):
        data = bytearray(middle[1].read_bytes())
        data[len(data) // 2] ^= 0x01
        middle[1].write_bytes(bytes(data))
    else:
        extra = tmp_path / "src" / "files" / "src" / "planted.py"
        extra.write_text("import os\n")
        members.insert(len(members) // 2, ("files/src/planted.py", extra, 0o644))
    bad = tmp_path / "bad.tar.zst"
    write_tar(bad, members)
    res = _deploy_stream(deployed, manifest, bad.read_bytes())
    assert res.returncode != 0
    assert res.stderr.decode().count("\n") == 1  # one line, no traceback
    expected = {"altered bytes": "does not match its sha256",
                "altered bytes in the large file": "weights.bin in the upload does not match "
                                                   "its sha256",
                "an unlisted member": "which the manifest does not list as a file"}[damage]
    assert expected in res.stderr.decode() and "nothing was changed" in res.stderr.decode()
    assert tree(deployed) == before
    assert _leftovers(deployed) == []
    assert not (deployed / "src" / "planted.py").exists()


def test_a_fresh_upload_is_never_truncated_so_ext4_does_not_write_it_out(deployed, project,
                                                                          cli, tmp_path):
    """The upload's part file is only read back and removed: truncating it (to 0) made ext4
    write all of it to disk when it was closed (auto_da_alloc), ~117 MB for the bench's full
    deploy, and made its removal wait for the discards. Seen by strace: no truncate of a
    part file, for a first upload and for one that starts over."""
    strace = shutil.which("strace")
    assert strace, "strace is missing (tests/harness/install.py installs it)"
    _fill(project, 5)
    manifest, tar = _build(cli, project)
    data = tar.read_bytes()
    incoming = deployed / ".remoteops" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    leftover = incoming / f"stream-{manifest.content_id[:32]}-whole.tar.zst.part"
    for starts_over in (True, False):
        if starts_over:  # a part kept by a cut upload, which this one does not resume
            leftover.write_bytes(b"x" * 4096)
        log = tmp_path / f"strace-{starts_over}.log"
        res = subprocess.run(
            [strace, "-f", "-qq", "-y", "-o", str(log), "-e", "trace=truncate,ftruncate",
             sys.executable, "-m", "remoteops.agent", "deploy-stream", "--root", str(deployed),
             "--json"], input=stream_input(manifest, data, 0, None), capture_output=True,
            timeout=120)
        assert res.returncode == 0, res.stderr
        assert _deployed_exactly(deployed, manifest)
        assert _leftovers(deployed) == []
        truncated = [line for line in log.read_text().splitlines() if ".part" in line]
        assert truncated == []
        if starts_over:  # the same version again: a change to the next one
            _fill(project, 6)
            manifest, tar = _build(cli, project)
            data = tar.read_bytes()


def test_a_full_deploy_cut_in_the_middle_resumes_and_ends_byte_identical(deployed, project,
                                                                         cli):
    before = tree(deployed)
    _fill(project, 4)
    manifest, tar = _build(cli, project)
    data = tar.read_bytes()
    cut = len(data) * 2 // 3  # inside the small files' frames or the large file's
    res = _deploy_stream(deployed, manifest, data, upto=cut)
    assert res.returncode != 0 and b"it resumes there" in res.stderr
    assert tree(deployed) == before
    [part] = (deployed / ".remoteops" / "incoming").glob("*.part")
    assert part.read_bytes() == data[:cut]  # kept whole for the resume; the early stage dropped
    assert not (deployed / ".remoteops" / "staging").exists() or \
        not any((deployed / ".remoteops" / "staging").iterdir())
    # the next request hears how much is there and sends the rest
    res = _deploy_stream(deployed, manifest, data, offset=cut)
    assert res.returncode == 0, res.stderr
    plan, applied = _answers(res)
    assert plan["stream_parts"] == {"whole": cut}
    assert "staged_while_arriving" not in applied  # a resumed upload is staged after arrival
    assert _deployed_exactly(deployed, manifest)
    assert _leftovers(deployed) == []


@pytest.mark.parametrize("where", ["the small files' frames", "the large file's frame"])
def test_a_resumed_upload_whose_kept_part_was_damaged_changes_nothing_and_starts_over(
        deployed, project, cli, where):
    """The tar itself carries no hash: what the files' own checks catch, with the kept part
    removed so that the next deploy sends everything again."""
    before = tree(deployed)
    _fill(project, 5)
    manifest, tar = _build(cli, project)
    data = tar.read_bytes()
    cut = len(data) * 2 // 3
    res = _deploy_stream(deployed, manifest, data, upto=cut)
    assert res.returncode != 0 and b"it resumes there" in res.stderr
    [part] = (deployed / ".remoteops" / "incoming").glob("*.part")
    kept = bytearray(part.read_bytes())
    at = len(kept) // 10 if where == "the small files' frames" else len(kept) - 1000
    kept[at] ^= 0x40  # a flipped bit on the server's disk while nobody watched
    part.write_bytes(bytes(kept))
    res = _deploy_stream(deployed, manifest, data, offset=cut)
    assert res.returncode != 0
    err = res.stderr.decode()
    assert err.count("\n") == 1 and "nothing was changed" in err, err  # one line, no traceback
    assert tree(deployed) == before
    assert _leftovers(deployed) == []  # the damaged part is gone: the next deploy starts over
    res = _deploy_stream(deployed, manifest, data)
    assert res.returncode == 0, res.stderr
    assert _deployed_exactly(deployed, manifest)


@pytest.mark.parametrize("stdin", ["a pipe", "a file"])
def test_a_full_deploy_arrives_whole_from_a_pipe_or_a_file(deployed, project, cli, tmp_path,
                                                          stdin):
    """The tar goes from stdin to its part file by splice when stdin is a pipe, and is read
    and written when it is not (splice refuses a file): the same bytes either way."""
    _fill(project, 6)
    manifest, tar = _build(cli, project)
    data = stream_input(manifest, tar.read_bytes())
    argv = [sys.executable, "-m", "remoteops.agent", "deploy-stream", "--root", str(deployed),
            "--json"]
    if stdin == "a pipe":
        res = subprocess.run(argv, input=data, capture_output=True, timeout=120)
    else:
        (tmp_path / "stdin").write_bytes(data)
        with open(tmp_path / "stdin", "rb") as fh:
            res = subprocess.run(argv, stdin=fh, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr
    plan, applied = _answers(res)
    assert applied["staged_while_arriving"] == len(plan["need"])
    assert _deployed_exactly(deployed, manifest)
    assert _leftovers(deployed) == []
