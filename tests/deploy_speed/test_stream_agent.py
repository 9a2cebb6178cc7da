"""``deploy-stream`` fed by hand: what a cut, a missing go-ahead or damaged bytes leave behind.

The agent runs as the server runs it (``python -m remoteops.agent``), on a root that
a real deploy made; the stdin is what the laptop would send (``common/deploy_wire``),
cut or altered on purpose.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from remoteops.common.deploy_wire import GO, chunk_frame, encode_header
from remoteops.common.manifest import Manifest, content_id
from remoteops.laptop.delta import write_delta
from tests.test_deploy import ENV, make_project, tree

HEADER_EXTRA = {"holder": "test", "keep": 5, "agent": None}


@pytest.fixture
def deployed(cli, project, tmp_path) -> Path:
    """A server root holding the project's first version (deployed through the local target)."""
    make_project(project)
    root = tmp_path / "server"
    res = cli("deploy-bundle", "--host", "local", "--project-root", str(root), "--yes",
              env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return root


def current(root: Path) -> Manifest:
    return Manifest.from_json((root / ".remoteops" / "current.json").read_text())


def changed(base: Manifest, project: Path, rel: str, text: str) -> Manifest:
    """``base`` with ``rel`` given new content (written in the project too)."""
    (project / rel).write_text(text)
    data = text.encode()
    files = [dataclasses.replace(f, size=len(data), sha256=hashlib.sha256(data).hexdigest())
             if f.path == rel else f for f in base.files]
    cid = content_id(files, base.toolkit_wheel, base.plugins)
    return dataclasses.replace(base, files=files, version=base.version + 1, content_id=cid)


def agent(root: Path, stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remoteops.agent", "deploy-stream", "--root",
                           str(root), "--json"], input=stdin, capture_output=True, timeout=120)


def answer(res: subprocess.CompletedProcess) -> dict:
    from remoteops.common.wire import parse_marked

    return parse_marked(res.stdout.decode())


def request(base: Manifest, new: Manifest, delta: Path | None) -> tuple[bytes, bytes]:
    """The header and the delta's bytes, as the laptop sends them."""
    info = None
    body = b""
    if delta is not None:
        body = delta.read_bytes()
        info = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    return encode_header(base, new, info, dict(HEADER_EXTRA, agent=new.toolkit_version)), body


def test_the_changed_file_is_applied_with_its_hash_verified(deployed, project, tmp_path):
    base = current(deployed)
    new = changed(base, project, "code/util.py", "X = 2\n")
    delta = write_delta(Path(os.devnull), ["code/util.py"], tmp_path / "d.tar.zst",
                        manifest=new, source_dir=project)
    header, body = request(base, new, delta)
    # stdin that does not start with the mark: a login shell read part of it
    res = agent(deployed, header[5:] + body + GO)
    assert res.returncode != 0 and b"did not arrive on stdin" in res.stderr
    assert (deployed / "code" / "util.py").read_text() == "X = 1\n"
    res = agent(deployed, header + body + GO)
    assert res.returncode == 0, res.stderr
    out = answer(res)
    assert out["overwritten"] == 1 and out["version"] == base.version + 1
    assert (deployed / "code" / "util.py").read_text() == "X = 2\n"
    assert current(deployed).content_id == new.content_id


def test_a_file_that_does_not_match_its_hash_changes_nothing(deployed, project, tmp_path):
    base = current(deployed)
    before = tree(deployed)
    new = changed(base, project, "code/util.py", "X = 2\n")
    (project / "code" / "util.py").write_text("X = 3\n")  # the bytes sent differ
    new_tar = tmp_path / "bad.tar.zst"
    write_delta(Path(os.devnull), ["code/util.py"], new_tar,
                manifest=dataclasses.replace(new, files=[
                    dataclasses.replace(f, sha256=hashlib.sha256(b"X = 3\n").hexdigest())
                    if f.path == "code/util.py" else f for f in new.files]),
                source_dir=project)
    header, body = request(base, new, new_tar)
    res = agent(deployed, header + body + GO)
    assert res.returncode != 0
    assert b"does not match its sha256" in res.stderr and b"nothing was changed" in res.stderr
    assert tree(deployed) == before and current(deployed).content_id == base.content_id


@pytest.mark.parametrize("cut", ["in the header", "in the files", "before the go-ahead"])
def test_a_cut_stream_leaves_the_server_unchanged(deployed, project, tmp_path, cut):
    base = current(deployed)
    before = tree(deployed)
    new = changed(base, project, "code/train.py", "print('v2')\n")
    delta = write_delta(Path(os.devnull), ["code/train.py"], tmp_path / "d.tar.zst",
                        manifest=new, source_dir=project)
    header, body = request(base, new, delta)
    stdin = {"in the header": header[:len(header) // 2],
             "in the files": header + body[:len(body) // 2],
             "before the go-ahead": header + body}[cut]
    res = agent(deployed, stdin)
    assert res.returncode != 0 and b"nothing was changed" in res.stderr
    assert tree(deployed) == before and current(deployed).content_id == base.content_id
    state = deployed / ".remoteops"
    assert not (state / "journal.json").exists() and not list((state / "incoming").glob("*"))
    # and the same request whole applies
    res = agent(deployed, header + body + GO)
    assert res.returncode == 0, res.stderr
    assert (deployed / "code" / "train.py").read_text() == "print('v2')\n"


def test_another_base_is_refused_with_base_differs(deployed, project):
    base = current(deployed)
    new = changed(base, project, "code/util.py", "X = 2\n")
    stale = dataclasses.replace(base, content_id="f" * 64)
    header, _ = request(stale, new, None)
    out = answer(agent(deployed, header + GO))
    assert out["base_differs"] and "not ffffffffffff" in out["reason"]
    assert current(deployed).content_id == base.content_id


def test_a_cut_full_upload_is_kept_and_resumed(deployed, project, tmp_path, cli):
    """The whole bundle in chunk frames: cut, the part stays; sent again from there, it applies."""
    (project / "data" / "more.txt").write_text("more\n" * 1000)
    res = cli("build-bundle", env=ENV)
    assert res.returncode == 0, res.stderr
    manifest_path = max((project / "bundles").glob("*.manifest.json"), key=os.path.getmtime)
    new = Manifest.from_json(manifest_path.read_text())
    tar = manifest_path.with_name(manifest_path.name.replace(".manifest.json", ".tar.zst"))
    data = tar.read_bytes()

    def send(offset: int, upto: int, finish: bool) -> subprocess.CompletedProcess:
        header = json.dumps({"manifest": json.loads(new.to_json()),
                             "delta": {"chunked": True, "offset": offset}, **HEADER_EXTRA})
        from remoteops.common.deploy_wire import MARK

        stdin = MARK + str(len(header)).encode() + b"\n" + header.encode()
        stdin += b"".join(chunk_frame(data[i:min(upto, i + 4096)])
                          for i in range(offset, upto, 4096))
        if finish:
            stdin += chunk_frame(b"") + json.dumps({"size": upto, "offset": offset}).encode() \
                + b"\n" + GO
        return agent(deployed, stdin)

    half = len(data) // 2
    res = send(0, half, finish=False)
    assert res.returncode != 0 and b"resumes there" in res.stderr
    [part] = (deployed / ".remoteops" / "incoming").glob("*.part")
    assert part.read_bytes() == data[:half]
    assert not (deployed / "data" / "more.txt").exists()
    res = send(half, len(data), finish=True)
    assert res.returncode == 0, res.stderr
    assert (deployed / "data" / "more.txt").read_text() == "more\n" * 1000
    assert current(deployed).content_id == new.content_id
    assert not list((deployed / ".remoteops" / "incoming").glob("*"))


def test_a_damaged_patch_changes_nothing(deployed, project):
    import zstandard

    base = current(deployed)
    old = (deployed / "data" / "style.jsonl").read_bytes()
    text = old.decode().replace('"a"', '"b"', 1)
    new = changed(base, project, "data/style.jsonl", text)
    raw = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    patch = bytearray(zstandard.ZstdCompressor(level=19, dict_data=raw).compress(text.encode()))
    patch[-6] ^= 0xFF
    sha_old = hashlib.sha256(old).hexdigest()
    header = encode_header(base, new, None, dict(HEADER_EXTRA, agent=new.toolkit_version,
                                                 patches=[["data/style.jsonl", sha_old,
                                                           len(patch)]]))
    before = tree(deployed)
    res = agent(deployed, header + bytes(patch) + GO)
    assert res.returncode != 0 and b"patched does not match its sha256" in res.stderr
    assert tree(deployed) == before and current(deployed).content_id == base.content_id
    # the same patch undamaged applies
    patch[-6] ^= 0xFF
    res = agent(deployed, header + bytes(patch) + GO)
    assert res.returncode == 0, res.stderr
    assert (deployed / "data" / "style.jsonl").read_text() == text
