"""What the laptop counts as a complete sample: unchanged across two looks and quiet for
settle_seconds; producers' temp names never; for JSONL, newline-terminated lines only."""

from __future__ import annotations

import os
import time

from remoteops.laptop.sync_source import Source


def test_a_sample_being_written_is_not_stable_until_it_stops_changing(tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "s2.tmp").mkdir()  # a producer's temp folder
    (tmp_path / "s2.tmp" / "a").write_bytes(b"y")
    (tmp_path / "empty").mkdir()   # not begun
    src = Source(tmp_path, "dirs", settle_seconds=0.3)
    first = src.look()
    assert first.stable == [] and first.pending == 2  # s1, and s2.tmp on its way
    time.sleep(0.35)
    with open(tmp_path / "s1" / "a.bin", "ab") as fh:  # the second chunk arrives
        fh.write(b"z" * 100)
    assert src.look().stable == []
    time.sleep(0.35)
    stable = src.look().stable
    assert [s.id for s in stable] == ["s1"] and stable[0].bytes == 200
    os.rename(tmp_path / "s2.tmp", tmp_path / "s2")  # renamed into place: a sample now
    assert [s.id for s in src.look().stable] == ["s1"]
    time.sleep(0.35)
    assert [s.id for s in src.look().stable] == ["s1", "s2"]


def test_jsonl_counts_only_complete_lines(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b": 2}\n{"c": ')
    look = Source(path, "jsonl", settle_seconds=5).look()
    assert [(s.id, s.data) for s in look.stable] == [("line-000001.jsonl", b'{"a": 1}\n'),
                                                     ("line-000003.jsonl", b'{"b": 2}\n')]
    assert look.pending == 1


def test_the_same_samples_pack_into_the_same_bytes(tmp_path):
    """What lets an upload cut half way resume into its part file on the next try."""
    from remoteops.laptop.sync_source import write_batch

    src = tmp_path / "src"
    for name in ("s1", "s2"):
        (src / name / "sub").mkdir(parents=True)
        (src / name / "sub" / "x.bin").write_bytes(os.urandom(5000))
    src_look = Source(src, "dirs", settle_seconds=0)
    src_look.look()
    samples = src_look.look().stable
    out = tmp_path / "out"
    out.mkdir()
    first, sha1 = write_batch(samples, out)
    data = first.read_bytes()
    first.unlink()
    os.utime(src / "s1" / "sub" / "x.bin", (1, 1))  # mtimes are not in the tar
    again, sha2 = write_batch(samples, out)
    assert sha1 == sha2 and again.read_bytes() == data and again.name == first.name
