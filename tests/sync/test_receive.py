"""The agent's side on its own: a batch is committed once, a commit killed half way
converges, a torn manifest line is cut off, and damaged or hostile batches change nothing."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from remoteops.common import live_data


def _agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remoteops.agent", *args], capture_output=True,
                          text=True, timeout=60)


def _tar(path: Path, samples: dict[str, bytes], index: list[dict] | None = None,
         extra: list[tarfile.TarInfo] = ()) -> str:
    """A batch of file samples; returns its sha256."""
    if index is None:
        index = [{"id": k, "path": k, "sha256": hashlib.sha256(v).hexdigest(), "bytes": len(v)}
                 for k, v in samples.items()]
    with tarfile.open(path, "w") as tar:
        head = json.dumps({"samples": index}).encode()
        info = tarfile.TarInfo(".batch.json")
        info.size = len(head)
        tar.addfile(info, io.BytesIO(head))
        for name, data in samples.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _receive(root: Path, tar: Path, sha: str) -> subprocess.CompletedProcess:
    return _agent("data-receive", "--root", str(root), "--dest", "data/live", "--tar", str(tar),
                  "--sha256", sha)


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "proj"


def test_the_same_batch_twice_commits_each_sample_once(root, tmp_path):
    samples = {"a.txt": b"alpha\n", "b.txt": b"beta\n"}
    tar = tmp_path / "b1.tar"
    sha = _tar(tar, samples)
    copy = tmp_path / "b1-again.tar"
    copy.write_bytes(tar.read_bytes())
    res = _receive(root, tar, sha)
    assert res.returncode == 0, res.stderr
    assert "added 2, skipped 0 already there; 2 sample(s) now" in res.stdout
    assert not tar.exists()  # consumed
    res = _receive(root, copy, sha)
    assert "added 0, skipped 2 already there; 2 sample(s) now" in res.stdout
    dest = root / "data" / "live"
    entries = live_data.read_manifest(dest)
    assert [e["id"] for e in entries] == ["a.txt", "b.txt"]
    assert len((dest / ".manifest.jsonl").read_text().splitlines()) == 2
    assert (dest / "a.txt").read_bytes() == b"alpha\n"
    out = json.loads(_agent("data-status", "--root", str(root), "--dest", "data/live", "--ids",
                            "--json").stdout.split("@@\n")[1].split("\n@@")[0])
    assert out["samples"] == 2 and out["ids"]["b.txt"] == hashlib.sha256(b"beta\n").hexdigest()


def test_a_commit_killed_before_its_manifest_line_converges(root, tmp_path):
    dest = root / "data" / "live"
    (dest / ".incoming" / "b-999-dead" / "c.txt").mkdir(parents=True)  # its scratch space
    (dest / "a.txt").write_bytes(b"alpha\n")    # renamed into place, then the agent died
    (dest / "b.txt").write_bytes(b"half of b")  # a stray, not what the laptop sends
    assert live_data.read_manifest(dest) == []  # unlisted: no reader sees them
    tar = tmp_path / "b.tar"
    res = _receive(root, tar, _tar(tar, {"a.txt": b"alpha\n", "b.txt": b"beta\n"}))
    assert res.returncode == 0, res.stderr
    assert [e["id"] for e in live_data.read_manifest(dest)] == ["a.txt", "b.txt"]
    assert (dest / "b.txt").read_bytes() == b"beta\n"
    assert not any((dest / ".incoming").iterdir())


def test_a_torn_manifest_line_is_cut_off_before_the_next_commit(root, tmp_path):
    tar = tmp_path / "1.tar"
    assert _receive(root, tar, _tar(tar, {"a.txt": b"a\n"})).returncode == 0
    manifest = root / "data" / "live" / ".manifest.jsonl"
    with open(manifest, "ab") as fh:
        fh.write(b'{"id": "zz.txt", "path": "zz.txt", "sha')  # power lost mid-append
    assert [e["id"] for e in live_data.read_manifest(manifest.parent)] == ["a.txt"]
    tar = tmp_path / "2.tar"
    assert _receive(root, tar, _tar(tar, {"b.txt": b"b\n"})).returncode == 0
    lines = manifest.read_text().splitlines()
    assert [json.loads(l)["id"] for l in lines] == ["a.txt", "b.txt"]


def test_damaged_or_hostile_batches_change_nothing(root, tmp_path):
    dest = root / "data" / "live"
    tar = tmp_path / "d.tar"
    sha = _tar(tar, {"a.txt": b"a\n"})
    res = _receive(root, tar, "0" * 64)
    assert res.returncode == 2 and "arrived damaged" in res.stderr and "Traceback" not in \
        res.stderr
    assert not tar.exists()

    link = tarfile.TarInfo("a.txt/evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _tar(tar, {"a.txt": b"a\n"}, extra=[link])
    res = _receive(root, tar, hashlib.sha256(tar.read_bytes()).hexdigest())
    assert res.returncode == 2 and "refusing the batch" in res.stderr

    sneaky = tarfile.TarInfo("../outside.txt")
    _tar(tar, {"a.txt": b"a\n"}, extra=[sneaky])
    res = _receive(root, tar, hashlib.sha256(tar.read_bytes()).hexdigest())
    assert res.returncode == 2 and "'..'" in res.stderr

    _tar(tar, {"a.txt": b"a\n"}, index=[{"id": "a.txt", "path": "a.txt", "sha256": "f" * 64}])
    res = _receive(root, tar, hashlib.sha256(tar.read_bytes()).hexdigest())
    assert res.returncode == 2 and "another sha256" in res.stderr

    _tar(tar, {"a.txt": b"a\n"}, index=[{"id": "../x", "path": "../x", "sha256": sha}])
    res = _receive(root, tar, hashlib.sha256(tar.read_bytes()).hexdigest())
    assert res.returncode == 2 and "lists a bad sample" in res.stderr
    assert live_data.read_manifest(dest) == []
    assert not (tmp_path / "outside.txt").exists() and not (root / "data" / "outside.txt").exists()
    assert [p.name for p in dest.iterdir() if not p.name.startswith(".")] == []
    assert not any((dest / ".incoming").iterdir())


def test_done_checks_the_count_and_closes_the_set(root, tmp_path):
    tar = tmp_path / "1.tar"
    assert _receive(root, tar, _tar(tar, {"a.txt": b"a\n"})).returncode == 0
    args = ("data-done", "--root", str(root), "--dest", "data/live")
    res = _agent(*args, "--expect", "3")
    assert res.returncode == 2 and "holds 1 sample(s), the laptop expects 3" in res.stderr
    assert _agent(*args, "--expect", "1").returncode == 0
    assert live_data.read_complete(root / "data" / "live")["samples"] == 1
    for command in ("data-status", "data-receive", "data-done"):
        assert _agent(command, "--help").returncode == 0
