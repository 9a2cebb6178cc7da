"""remoteops.common: atomic writes, sha256, stamps and sizes, and its import boundary."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from remoteops.common import clock, files, sizes
from remoteops.common.files import (CHUNK, fsync_dirs, sha256_file, sha256_fileobj, temp_name,
                                    write_atomic_bytes, write_atomic_json, write_atomic_text)
from remoteops.common.sizes import human_size


# -- files -------------------------------------------------------------------------------------

def test_atomic_bytes_land_exactly_and_leave_no_temp(tmp_path):
    dest = tmp_path / "new" / "sub" / "data.bin"  # missing folders are created
    write_atomic_bytes(dest, b"\x00first\xff")
    write_atomic_bytes(dest, b"second")
    assert dest.read_bytes() == b"second"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data.bin"]


def test_atomic_text_is_utf8_without_newline_translation(tmp_path):
    dest = tmp_path / "t.txt"
    write_atomic_text(dest, "h\u00e9\nline\n")
    assert dest.read_bytes() == "h\u00e9\nline\n".encode("utf-8")


def test_atomic_json_formats(tmp_path):
    obj = {"b": "\u00e9", "a": [1, Path("x")]}
    write_atomic_json(tmp_path / "default.json", {"k": 1})
    assert (tmp_path / "default.json").read_bytes() == b'{\n  "k": 1\n}\n'
    # the ledger/backup format: indent 1, UTF-8 as is, no trailing newline
    write_atomic_json(tmp_path / "apply.json", {"k": "\u00e9"}, indent=1, ensure_ascii=False,
                      newline=False)
    assert (tmp_path / "apply.json").read_bytes() == '{\n "k": "\u00e9"\n}'.encode("utf-8")
    # state.json: indent 1, ASCII escapes, default=str, trailing newline
    write_atomic_json(tmp_path / "state.json", obj, indent=1, default=str)
    assert (tmp_path / "state.json").read_text() == json.dumps(obj, indent=1, default=str) + "\n"
    assert "\\u00e9" in (tmp_path / "state.json").read_text()


def test_atomic_write_of_a_255_byte_name(tmp_path):
    name = "n" * 250 + ".json"
    assert len(os.fsencode(name)) == 255
    write_atomic_json(tmp_path / name, [1, 2])
    assert json.loads((tmp_path / name).read_text()) == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == [name]
    multibyte = "\u00e9" * 127 + "x"  # 255 bytes in UTF-8
    assert len(os.fsencode(multibyte)) == 255
    write_atomic_text(tmp_path / multibyte, "ok")
    assert (tmp_path / multibyte).read_text() == "ok"


def test_temp_name_is_short_hidden_and_stable():
    long = "x" * 255
    assert temp_name(long) == temp_name(long) != temp_name("y")
    assert temp_name(long).startswith(".remoteops-tmp-") and len(temp_name(long)) == 31


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    dest = tmp_path / "keep.json"
    write_atomic_json(dest, {"v": 1})
    with pytest.raises(TypeError):
        write_atomic_json(dest, {"v": object()})  # not serialisable: nothing written
    with pytest.raises(TypeError):
        write_atomic_bytes(dest, "not bytes")  # fails inside the temp file
    assert json.loads(dest.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_a_stale_temp_file_does_not_block_a_write(tmp_path):
    dest = tmp_path / "state.json"
    stale = tmp_path / f"{temp_name(dest.name)}.{os.getpid()}.{threading.get_native_id()}.tmp"
    stale.write_text("half a write from a crashed process")
    write_atomic_text(dest, "whole\n")
    assert dest.read_text() == "whole\n" and not stale.exists()


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    dest = tmp_path / "heartbeat"
    payloads = [(str(i) * 50_000).encode() for i in range(8)]
    errors: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(20):
                write_atomic_bytes(dest, data)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert dest.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["heartbeat"]


def test_temp_names_end_in_tmp_so_collect_skips_them(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (seen.append(Path(a).name),
                                                          real_replace(a, b)))
    write_atomic_text(tmp_path / "x", "1")
    assert len(seen) == 1 and seen[0].endswith(".tmp") and seen[0].startswith(".remoteops-tmp-")


def test_sha256_of_files_and_streams(tmp_path):
    data = os.urandom(CHUNK * 2 + 7)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert CHUNK == 1 << 20
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()
    assert sha256_fileobj(io.BytesIO(data)) == (len(data), hashlib.sha256(data).hexdigest())
    assert sha256_fileobj(io.BytesIO(data), limit=CHUNK + 3) == (
        CHUNK + 3, hashlib.sha256(data[:CHUNK + 3]).hexdigest())
    assert sha256_fileobj(io.BytesIO(b"ab"), limit=10) == (2, hashlib.sha256(b"ab").hexdigest())
    assert sha256_fileobj(io.BytesIO(b"")) == (0, hashlib.sha256(b"").hexdigest())


def test_fsync_dirs_skips_what_is_gone_or_a_link(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    fsync_dirs([tmp_path / "a", str(tmp_path), tmp_path / "gone", tmp_path / "link"])


# -- clock -------------------------------------------------------------------------------------

def test_stamp_and_iso_formats_on_a_fixed_time(monkeypatch):
    import time as time_mod

    fixed = time_mod.struct_time((2026, 11, 26, 13, 5, 9, 3, 330, 0))
    monkeypatch.setattr(clock.time, "gmtime", lambda *a: fixed)
    assert clock.utc_stamp() == "20261126T130509Z"
    assert clock.now_iso() == "2026-11-26T13:05:09Z"


def test_precise_iso_is_datetime_isoformat_in_utc():
    value = clock.now_iso_precise()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?\+00:00", value)
    assert re.fullmatch(r"\d{8}T\d{6}Z", clock.utc_stamp())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", clock.now_iso())


# -- sizes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, units, shown", [
    (0, "si", "0 B"), (23, "si", "23 B"), (999, "si", "999 B"), (1000, "si", "1.0 KB"),
    (107_700, "si", "107.7 KB"), (1_500_000, "si", "1.5 MB"), (2.5e12, "si", "2500.0 GB"),
    (-1500, "si", "-1.5 KB"),
    (1023, "binary", "1023 B"), (1024, "binary", "1.0 KB"), (1536, "binary", "1.5 KB"),
    (5 << 20, "binary", "5.0 MB"), (3 << 40, "binary", "3072.0 GB"),
    (None, "iec", "n/a"), (1536, "iec", "1.5 KiB"), (7 << 30, "iec", "7.0 GiB"),
    (5 << 40, "iec", "5.0 TiB"), (5 << 50, "iec", "5120.0 TiB"),
])
def test_human_size(n, units, shown):
    assert human_size(n, units) == shown


def test_human_size_defaults_to_si_as_the_readme_shows():
    assert human_size(23) == "23 B" and human_size(1000) == "1.0 KB"
    assert set(sizes.UNITS) == {"si", "binary", "iec"}


# -- the boundary ------------------------------------------------------------------------------

def _modules_after_importing_common(stub_parent: bool) -> list[str]:
    """sys.modules of a fresh interpreter after importing every ``remoteops.common`` module.
    With ``stub_parent`` the package ``remoteops`` is an empty stand-in, so what is loaded
    is what common itself imports (the real ``remoteops/__init__`` loads the plugin API)."""
    root = Path(__file__).resolve().parents[1]
    code = f"""
import importlib, json, pkgutil, sys, types
if {stub_parent!r}:
    stub = types.ModuleType("remoteops")
    stub.__path__ = [{str(root / "remoteops")!r}]
    sys.modules["remoteops"] = stub
import remoteops.common
for info in pkgutil.iter_modules(remoteops.common.__path__):
    importlib.import_module("remoteops.common." + info.name)
print(json.dumps(sorted(sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root).stdout
    return json.loads(out)


BANNED = ("torch", "transformers", "peft", "bitsandbytes", "llama_cpp", "fabric", "paramiko",
          "invoke", "click", "rich")


@pytest.mark.parametrize("stub_parent", [True, False])
def test_common_imports_nothing_outside_itself(stub_parent):
    """``remoteops.common`` is pure Python both sides use: no torch, no SSH, no CLI, and no
    other part of remoteops but ``remoteops.common.paths`` (checked in a fresh interpreter)."""
    loaded = _modules_after_importing_common(stub_parent)
    assert {"remoteops.common.files", "remoteops.common.clock",
            "remoteops.common.sizes"} <= set(loaded)
    assert [m for m in loaded if m.split(".")[0] in BANNED] == []
    if stub_parent:
        outside = [m for m in loaded if m.startswith("remoteops.")
                   and not m.startswith("remoteops.common") and m != "remoteops.common.paths"]
        assert outside == []


def test_atomic_output_streams_into_place_or_leaves_the_old_file(tmp_path):
    dest = tmp_path / "deep" / "bundle.tar.zst"
    with files.atomic_output(dest) as fh:
        for _ in range(3):
            fh.write(b"x" * CHUNK)
        assert not dest.exists()  # nothing at the name until the block ends
    assert dest.read_bytes() == b"x" * (3 * CHUNK)
    with pytest.raises(RuntimeError):
        with files.atomic_output(dest) as fh:
            fh.write(b"half")
            raise RuntimeError("the writer died")
    assert dest.read_bytes() == b"x" * (3 * CHUNK)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bundle.tar.zst"]


def test_link_or_copy_places_the_bytes_whole(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(100_000))
    dest = tmp_path / "out" / "b.bin"
    files.link_or_copy(src, dest)
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["b.bin"]


def test_no_module_writes_a_temp_file_of_its_own():
    """Every streaming write goes through files.atomic_output: no module names its own
    ``<name>.tmp`` temp file beside a destination any more."""
    root = Path(__file__).resolve().parents[1] / "remoteops"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if re.search(r"""with_name\([^)]*["']\.tmp["']""", p.read_text())]
    assert offenders == []


def test_manifest_json_has_one_file_per_line_and_reads_back_the_same():
    from remoteops.common.manifest import BundleError, FileEntry, Manifest

    entries = [FileEntry("a/读我.md", 3, 0o644, "ab" * 32),
               FileEntry("bin/run", 0, 0o755, "cd" * 32, link="../run.sh")]
    manifest = Manifest(project="p", version=2, content_id="ef" * 32, created_at="2026-11-27",
                        source_commit=None, source_dirty=None, toolkit_version="0.1.0",
                        toolkit_wheel={"name": "w.whl", "size": 1}, plugins=["x==1"],
                        files=entries)
    text = manifest.to_json()
    data = json.loads(text)
    assert list(data) == sorted(data) and data["files"][1]["link"] == "../run.sh"
    assert [line for line in text.splitlines() if '"path"' in line] == [
        '  {"mode": 420, "path": "a/读我.md", "sha256": "' + "ab" * 32 + '", "size": 3},',
        '  {"link": "../run.sh", "mode": 493, "path": "bin/run", "sha256": "' + "cd" * 32
        + '", "size": 0}']
    again = Manifest.from_json(text)
    assert again == manifest and again.to_json() == text
    parsed = json.loads(text)  # a request's header carries it parsed: read as it is
    assert Manifest.from_data(parsed) == manifest and parsed == json.loads(text)
    with pytest.raises(BundleError, match="damaged"):
        Manifest.from_data(["not", "a", "manifest"])
    manifest.files = []
    assert json.loads(manifest.to_json())["files"] == []
