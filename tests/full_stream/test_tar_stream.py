"""``common.tar_stream.TarStream``, which ``bundle_tar.iter_members`` reads bundles with:
the same members and bytes as ``tarfile``'s stream mode, the same refusals. Real tars
written by ``tarfile`` and by ``write_tar``, real zstd."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
from pathlib import Path

import pytest
import zstandard

from remoteops.common.bundle_tar import BundleError, iter_members, write_tar
from remoteops.common.tar_stream import TarStream


def _tar(entries: list[tarfile.TarInfo | tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
    return out.getvalue()


def _walk_tarfile(data: bytes) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        return [(m.name, m.size, m.type, m.mode,
                 hashlib.sha256(tar.extractfile(m).read()).hexdigest() if m.isreg() else None)
                for m in tar]


def _walk_stream(data: bytes, read: int = 1 << 20) -> list[tuple]:
    stream = TarStream(io.BytesIO(data))
    out = []
    for m in stream:
        digest = None
        if m.isreg():
            h, fh = hashlib.sha256(), stream.data(m)
            for chunk in iter(lambda: fh.read(read), b""):
                h.update(chunk)
            digest = h.hexdigest()
        out.append((m.name, m.size, m.type, m.mode, digest))
    return out


def test_the_same_members_and_bytes_as_tarfile():
    rng = random.Random(3)
    folder = tarfile.TarInfo("a/dir/")
    folder.type = tarfile.DIRTYPE
    entries = [("short.txt", b"hello\n"), ("empty", b""), ("block", b"x" * 512),
               ("b" * 150 + "/long/name/" + "c" * 90, rng.randbytes(70_000)),  # a pax path
               ("é/ünïcode.py", b"print('\xc3\xa9')\n"), folder,
               ("big.bin", rng.randbytes(3 << 20))]
    for fmt in (tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        chosen = entries if fmt == tarfile.PAX_FORMAT else [e for e in entries if not (
            isinstance(e, tuple) and (len(e[0]) > 200 or not e[0].isascii()))]
        data = _tar(chosen, fmt)
        expected = _walk_tarfile(data)
        assert len(expected) == len(chosen)
        assert _walk_stream(data) == expected
        assert _walk_stream(data, read=1000) == expected


def test_members_skipped_unread_and_the_end_where_tarfile_ends():
    data = _tar([("one", b"1" * 1000), ("two", b"2" * 3000), ("three", b"3")])
    stream = TarStream(io.BytesIO(data))
    names = [m.name for m in stream]  # nothing read: each member's bytes are skipped
    assert names == ["one", "two", "three"]
    # a damaged header after the first ends the members, as tarfile's stream mode does
    second = data.index(b"two\x00")
    broken = data[:second + 148] + b"99999999" + data[second + 156:]
    assert [m.name for m in TarStream(io.BytesIO(broken))] == \
        [m[0] for m in _walk_tarfile(broken)] == ["one"]
    with pytest.raises(tarfile.ReadError):
        list(TarStream(io.BytesIO(b"\x01" * 512)))  # the first header unreadable
    with pytest.raises(tarfile.ReadError, match="empty file"):
        list(TarStream(io.BytesIO(b"")))


def test_data_cut_short_and_a_member_read_too_late_are_errors():
    data = _tar([("one", b"1" * 5000), ("two", b"2" * 10)])
    stream = TarStream(io.BytesIO(data[:512 + 3000]))
    member = next(iter(stream))
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        stream.data(member).read()
    stream = TarStream(io.BytesIO(data))
    members = iter(stream)
    first = next(members)
    fh = stream.data(first)
    next(members)
    with pytest.raises(tarfile.StreamError):
        fh.read(1)


def _bundle(tmp_path: Path, entries) -> Path:
    path = tmp_path / "b.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(_tar(entries)))
    return path


def _special(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("entry, says", [
    (_special("files/l", tarfile.SYMTYPE, "/etc/passwd"), "link or device"),
    (_special("files/h", tarfile.LNKTYPE, "files/ok"), "link or device"),
    (_special("files/dev", tarfile.CHRTYPE), "link or device"),
    (_special("files/fifo", tarfile.FIFOTYPE), "link or device"),
    (_special("files/sparse", tarfile.GNUTYPE_SPARSE), "sparse"),
    (("/etc/cron.d/x", b"x"), "absolute"),
    (("files/../../x", b"x"), "'..'"),
    ((".remoteops/journal.json", b"{}"), "reserved"),
])
def test_unsafe_members_are_refused(tmp_path, entry, says):
    bundle = _bundle(tmp_path, [("files/ok", b"ok\n"), entry, ("files/after", b"a")])
    seen = []
    with pytest.raises(BundleError, match=says):
        for member, _ in iter_members(bundle):
            seen.append(member.name)
    assert seen == ["files/ok"]


def test_a_bundle_cut_in_a_member_is_truncated(tmp_path):
    members = []
    for i in range(3):
        src = tmp_path / f"f{i}"
        src.write_bytes(random.Random(i).randbytes(200_000))
        members.append((f"files/f{i}", src, 0o644))
    whole = tmp_path / "whole.tar.zst"
    write_tar(whole, members)
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    with pytest.raises(BundleError, match="truncated or corrupted"):
        for member, fh in iter_members(cut):
            while fh.read(1 << 16):
                pass


class _Trickle(io.RawIOBase):
    """A source that gives at most ``most`` bytes a call, as a pipe or a decompressor may."""

    def __init__(self, data: bytes, most: int):
        self._data, self._most, self._pos = data, most, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self._most if n < 0 else min(n, self._most)
        out = self._data[self._pos:self._pos + n]
        self._pos += len(out)
        return out


@pytest.mark.parametrize("most", [37, 511, 7919, 1 << 20])
def test_short_reads_skips_and_members_read_in_part(most):
    """A source that gives little a call (a pipe, a decompressor), members around a block and
    around the skip size, members skipped unread or read in part: tarfile's members and
    bytes."""
    from remoteops.common.tar_stream import SKIP

    rng = random.Random(most)
    sizes = [0, 1, 511, 512, 513, SKIP - 1, SKIP, SKIP + 1, 3 * SKIP + 5, 9, 70_000]
    entries = [(f"m{i:02d}_{size}", rng.randbytes(size)) for i, size in enumerate(sizes)]
    data = _tar(entries)
    expected = _walk_tarfile(data)
    got, source = [], _Trickle(data, most)
    stream = TarStream(source)
    for i, m in enumerate(stream):
        if i % 3 == 1:  # skipped unread
            got.append((m.name, m.size, None))
            continue
        fh = stream.data(m)
        if i % 3 == 2:  # read in part, in odd pieces, the rest skipped
            part = fh.read(m.size // 2 + 1) if m.size else b""
            got.append((m.name, m.size, hashlib.sha256(part).hexdigest(), len(part)))
            continue
        whole = b"".join(iter(lambda: fh.read(rng.choice([1, 100, 4096, SKIP + 3])), b""))
        got.append((m.name, m.size, hashlib.sha256(whole).hexdigest()))
    want = []
    for i, (name, size, _, _, digest) in enumerate(expected):
        body = dict(entries)[name]
        if i % 3 == 1:
            want.append((name, size, None))
        elif i % 3 == 2:
            part = body[:size // 2 + 1] if size else b""
            want.append((name, size, hashlib.sha256(part).hexdigest(), len(part)))
        else:
            want.append((name, size, digest))
    assert got == want
