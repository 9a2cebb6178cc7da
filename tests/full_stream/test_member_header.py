"""``member_header``: a bundle member's tar header, made without tarfile for plain names,
must be byte for byte what tarfile makes (bundles stay byte-identical, and earlier
bundles' frames stay reusable)."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from remoteops.common.tar_header import member_header, read_header, tarinfo


def _tarfile_header(name: str, size: int, mode: int) -> bytes:
    return tarinfo(name, size, mode).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "strict")


@pytest.mark.parametrize("name,size,mode", [
    ("files/a.py", 0, 0o644),
    ("files/run.sh", 12345, 0o755),
    ("x" * 99, 1, 0o600),
    ("x" * 100, 1, 0o644),  # the longest name a plain header holds
    ("x" * 101, 1, 0o644),  # a pax header
    ("files/读我.md", 3, 0o644),  # not ASCII: a pax header
    ("files/with space/é.txt", 9, 0o644),
    ("files/big.bin", 8 ** 11 - 1, 0o644),  # the largest size in 11 octal digits
    ("files/huge.bin", 8 ** 11, 0o644),  # 8 GiB: a pax header
    ("files/setuid", 7, 0o104755),  # only the permission bits are kept
])
def test_the_header_is_what_tarfile_writes(name, size, mode):
    assert member_header(name, size, mode) == _tarfile_header(name, size, mode)


def test_random_plain_names_match_and_read_back():
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_-./"
    for _ in range(500):
        name = "files/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 94)))
        size, mode = rng.randint(0, 8 ** 11 - 1), rng.choice([0o644, 0o755, 0o600, 0o444])
        header = member_header(name, size, mode)
        assert header == _tarfile_header(name, size, mode)
        info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
        assert (info.name, info.size, info.mode) == (name, size, mode)


def test_a_tar_of_such_headers_reads_back_with_tarfile():
    out = io.BytesIO()
    for name, data in (("files/a.txt", b"hello"), ("files/b/c.py", b"x" * 700)):
        out.write(member_header(name, len(data), 0o644))
        out.write(data + bytes(-len(data) % tarfile.BLOCKSIZE))
    out.write(bytes(2 * tarfile.BLOCKSIZE))
    out.seek(0)
    with tarfile.open(fileobj=out, mode="r|") as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar}
    assert got == {"files/a.txt": b"hello", "files/b/c.py": b"x" * 700}


FIELDS = ("name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname",
          "uname", "gname", "devmajor", "devminor")


def _fields(info: tarfile.TarInfo) -> dict:
    return {k: getattr(info, k) for k in FIELDS}


def _frombuf(buf: bytes) -> tarfile.TarInfo:
    return tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")


@pytest.mark.parametrize("name,size,mode", [
    ("files/a.py", 0, 0o644), ("x" * 100, 5, 0o755), ("files/big.bin", 8 ** 11 - 1, 0o600),
    ("toolkit/remoteops-0.1.0-py3-none-any.whl", 123456, 0o644)])
def test_a_header_reads_back_as_tarfile_reads_it(name, size, mode):
    header = member_header(name, size, mode)
    assert _fields(read_header(header)) == _fields(_frombuf(header))
    assert (read_header(header).name, read_header(header).size) == (name, size)


def test_headers_remoteops_does_not_write_read_as_tarfile_reads_them():
    def header_of(info: tarfile.TarInfo) -> bytes:
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")

    folder = tarinfo("files/sub", 0, 0o755)
    folder.type = tarfile.DIRTYPE
    link = tarinfo("files/link", 0, 0o777)
    link.type, link.linkname = tarfile.SYMTYPE, "../etc/passwd"
    owned = tarinfo("files/owned", 3, 0o644)
    owned.uid, owned.uname, owned.mtime = 1000, "someone", 1_700_000_000
    for info in (folder, link, owned):
        buf = header_of(info)
        assert _fields(read_header(buf)) == _fields(_frombuf(buf))


@pytest.mark.parametrize("damage", ["checksum", "size digits", "truncated", "zeros"])
def test_a_damaged_header_fails_as_tarfile_fails(damage):
    buf = bytearray(member_header("files/a.py", 10, 0o644))
    if damage == "checksum":
        buf[0] ^= 1  # the name changed: the checksum no longer holds
    elif damage == "size digits":
        buf[124:135] = b"0000000001x"
    elif damage == "truncated":
        buf = buf[:300]
    else:
        buf = bytearray(tarfile.BLOCKSIZE)
    with pytest.raises(tarfile.HeaderError) as ours:
        read_header(bytes(buf))
    with pytest.raises(tarfile.HeaderError) as theirs:
        _frombuf(bytes(buf))
    assert type(ours.value) is type(theirs.value)
