"""The bundle tar itself: deterministic zstd-framed writing and safe, checked reading.

Each large file gets its own zstd frame and small files are grouped at
boundaries that depend only on their names, so a new bundle version copies
the unchanged frames of the previous one (after checking them) and still
comes out byte-identical to a fresh build. Reading normalises member names,
refuses any that could leave the root (``remoteops.common.paths``), links and
devices, and turns any corruption into a ``BundleError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

from remoteops.common.files import CHUNK, atomic_output, stat_key, write_atomic_text
from remoteops.common.errors import RemoteOpsError
from remoteops.common.paths import UnsafePath, safe_relpath
from remoteops.common.tar_header import member_header

FORMAT = 1


class BundleError(RemoteOpsError):
    """A bundle is missing, tampered with, truncated, or unsafe."""


# The tar stream is compressed as a series of independent zstd frames ("segments"):
# each large file alone, small files in groups whose boundaries depend only on
# member names. A segment's frame is a pure function of its bytes and the level, so
# a new version copies the frames of unchanged segments from the previous bundle
# (checked first unless the file is provably the one indexed) instead of compressing
# everything again: same bytes either way. A large member whose bytes do not compress
# (model weights, archives) is stored: its frame holds raw blocks (``_stored``).
SEGMENT_ALONE = 1 << 20     # members this large get a frame of their own
SEGMENT_EVERY = 16          # about one group boundary per this many small members
FRAMES_DIR = ".frames"


def frames_index_path(tar_path: Path) -> Path:
    return tar_path.parent / FRAMES_DIR / (tar_path.name + ".json")


def _segments(members: list[tuple]) -> list[list[tuple]]:
    out: list[list[tuple]] = []
    current: list[tuple] = []
    for member in members:
        big = member[3] >= SEGMENT_ALONE
        boundary = hashlib.sha256(member[0].encode()).digest()[0] < 256 // SEGMENT_EVERY
        if current and (big or boundary or current[-1][3] >= SEGMENT_ALONE):
            out.append(current)
            current = []
        current.append(member)
    if current:
        out.append(current)
    return out


def stream_order(members: list[tuple]) -> list[tuple]:
    """``members`` (``(name, source, mode, size, ...)``) in the order the tar holds them:
    the large ones (a frame each) after all the others, each group in its given order.
    The server extracts a full deploy while it arrives; a small file costs it far more
    time per byte (a header, a create, a hash) than a large one, so the small files are
    extracted while the large ones still travel, and the stream ends with the cheap bytes."""
    return ([m for m in members if m[3] < SEGMENT_ALONE]
            + [m for m in members if m[3] >= SEGMENT_ALONE])


def _segment_key(level: int, segment: list[tuple], tail: int) -> str | None:
    """What a segment's frame depends on: its members and, for the last, the end padding
    (a large member's frame may be stored rather than compressed: ``_stored``)."""
    if any(m[4] is None for m in segment):
        return None
    body = json.dumps([FORMAT, level, tail, [[m[0], m[3], m[2], m[4]] for m in segment]]
                      + (["stored-1"] if _alone(segment) else []))
    return hashlib.sha256(body.encode()).hexdigest()


def _identity(path: Path) -> list[int]:
    """A written tar's ``stat_key``: unchanged, its frames are as indexed."""
    return list(stat_key(path.stat()))


def _reusable_frames(previous: Path | None, level: int) -> tuple[dict[str, dict], bool]:
    """The frames of ``previous`` by key, and whether the file is provably the one indexed
    (then they are copied without reading them back first)."""
    if previous is None:
        return {}, False
    try:
        index = json.loads(frames_index_path(previous).read_text())
        if index.get("level") != level or not previous.is_file():
            return {}, False
        return ({f["key"]: f for f in index["frames"] if f.get("key")},
                index.get("tar") == _identity(previous))
    except (OSError, ValueError, KeyError, TypeError):
        return {}, False


class _Window:
    """At most ``left`` bytes of ``fh`` from where it stands (one frame of a tar)."""

    def __init__(self, fh, left: int):
        self.fh, self.left = fh, left

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data


def _frame_intact(src, frame: dict) -> bool:
    """``frame`` of ``src`` decompresses, zstd's own checksum of its content holds, and it is
    as long as indexed: what a frame of an earlier bundle that may have been touched since
    must show before it is copied (no sha256 of every frame written: it cost a full pass
    over each bundle written, for a file that is rarely touched)."""
    import zstandard

    if "raw" not in frame:
        return False  # an index from before: not checkable, the frame is compressed again
    if frame.get("stored"):
        return False  # no checksum to check it by: storing it again costs no more
    src.seek(frame["offset"])
    window = _Window(src, frame["length"])
    got = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(window, read_across_frames=False,
                                                        closefd=False) as zr:
            while True:
                chunk = zr.read(CHUNK)
                if not chunk:
                    break
                got += len(chunk)
    except zstandard.ZstdError:
        return False
    return got == frame["raw"] and window.left == 0


def _copy_range(sink, src, frame: dict, trusted: bool = False) -> bool:
    """Append ``frame`` of ``src`` to ``sink``, checking it first (``_frame_intact``) unless
    ``trusted`` (the file has the size, mtime and inode it had when indexed: a redeploy of
    one file then does not read the whole previous bundle); the copy is made by the kernel
    (copy_file_range: no pass through Python, ~6x faster for a large frame), else read and
    written. False: the frame is not what the index says. The server checks every file's
    sha256 in any case."""
    if not trusted and not _frame_intact(src, frame):
        return False
    fh = sink.raw if isinstance(sink, _Tapped) else sink
    fh.flush()
    start, done = fh.tell(), 0
    try:
        while done < frame["length"]:
            n = os.copy_file_range(src.fileno(), fh.fileno(), frame["length"] - done,
                                   frame["offset"] + done, start + done)
            if n <= 0:
                raise OSError("copy_file_range copied nothing")
            done += n
        fh.seek(start + done)
    except (OSError, AttributeError):  # another file system, an old kernel: plain copy
        fh.seek(start)
        src.seek(frame["offset"])
        sink.write(src.read(frame["length"]))  # checked above; the file is ours
        return True
    if isinstance(sink, _Tapped):
        sink.total += done
        sink.flush()
    return True


class _Tapped:
    """The tar's file, telling ``tap`` (``opened(path)``, ``wrote(total)``) as bytes land, so
    a reader can send them while the rest is still being compressed."""

    EVERY = 256 << 10

    def __init__(self, raw, tap):
        self.raw, self.tap, self.total, self.told = raw, tap, 0, 0
        tap.opened(raw.name)

    def write(self, data: bytes) -> None:
        self.raw.write(data)
        self.total += len(data)
        if self.total - self.told >= self.EVERY:
            self.flush()

    def flush(self) -> None:
        self.raw.flush()
        self.told = self.total
        self.tap.wrote(self.total)


def write_tar(out: Path, members: list[tuple], level: int = 3,
              previous: Path | None = None, tap=None, late=None,
              seen: dict[str, os.stat_result] | None = None) -> dict:
    """A deterministic zstd-compressed tar of ``(name, source, mode[, sha256[, stat]])``
    members (``stat``: ``stat_key`` of the file when ``sha256`` was made, at least a few
    seconds after its last change; unchanged, it is not hashed again while compressed).

    Written atomically, as independent frames (see ``_segments``); frames of segments
    that ``previous`` (an earlier bundle) already holds are copied from it. Returns
    ``{"frames", "reused", "reused_bytes"}``. ``tap``: told as the bytes are written (see
    ``_Tapped``) and, at the end, ``closed(error or None)``.

    ``late``: the members' sha256 are still being made (a first bundle is compressed while
    the laptop hashes its files): a member listed without one is not hashed here when
    ``late.settled(stat)`` (the hash pass will not hash it again either), else it is;
    ``late.check()`` (raises when the hashing failed) runs before each frame and
    ``late.wait()`` gives ``{name: (sha256, stat when hashed or None)}`` before the tar is
    put in place, for the frames' keys (see ``_late_keys``).

    ``seen``: ``{name: stat}`` the caller took of members just before, used instead of
    a second ``stat`` (while a first bundle's files are hashed, 2,000 more ``stat`` calls
    in this thread waited for the GIL: the tar's first byte came ~70 ms later).
    """
    import zstandard

    sized = []
    for m in members:
        name, source, mode = m[:3]
        st = seen[name] if seen is not None and name in seen else os.stat(source)
        now = stat_key(st)
        # the stat it was hashed at (5th item), unchanged: the hash need not be made again
        same = (len(m) > 4 and m[4] is not None and tuple(m[4]) == now) or \
            (late is not None and (len(m) < 4 or m[3] is None) and late.settled(st))
        sized.append((name, source, mode, st.st_size, m[3] if len(m) > 3 else None, same, now))
    segments = _segments(stream_order(sized))
    reuse, trusted = _reusable_frames(previous, level)
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=0)
    frames: list[dict] = []
    offset = 0
    tar_offset = 0
    stats = {"frames": len(segments), "reused": 0, "reused_bytes": 0}
    src = open(previous, "rb") if reuse else None
    try:
        with atomic_output(out) as raw:
            if tap is not None:
                raw = _Tapped(raw, tap)
            made = []  # (frame, segment, tail length) whose keys wait for ``late``
            computed: dict[str, str] = {}  # sha256 of what was read, for members hashed here
            for i, segment in enumerate(segments):
                if late is not None:
                    late.check()
                last = i == len(segments) - 1
                headers = [member_header(m[0], m[3], m[2]) for m in segment]
                length = sum(len(h) + m[3] + (-m[3] % tarfile.BLOCKSIZE)
                             for h, m in zip(headers, segment))
                tail = b""
                if last:
                    end = tar_offset + length + 2 * tarfile.BLOCKSIZE
                    tail = tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE))
                    length += len(tail)
                tar_offset += length
                key = _segment_key(level, segment, len(tail) if last else -1)
                stored = False
                if key in reuse and src and _copy_range(raw, src, reuse[key], trusted):
                    size, stored = reuse[key]["length"], bool(reuse[key].get("stored"))
                    stats["reused"] += 1
                    stats["reused_bytes"] += size
                else:
                    stored = _alone(segment) and _stored(segment[0][1], segment[0][3], level)
                    if stored:
                        size, intact = _store_segment(raw, segment, headers, tail, length,
                                                      computed)
                    else:
                        size, intact = _compress_segment(cctx, raw, segment, headers, tail,
                                                         length, computed)
                    if not intact:
                        key = None  # a file changed while bundling: never reuse this frame
                    elif late is not None and key is None:
                        made.append((len(frames), segment, len(tail) if last else -1))
                frames.append({"key": key, "offset": offset, "length": size, "raw": length,
                               **({"stored": True} if stored else {})})
                offset += size
            if late is not None:
                _late_keys(frames, made, level, late.wait(), computed)
            if tap is not None:
                raw.flush()
    except BaseException as exc:
        if tap is not None:
            tap.closed(exc)
        raise
    finally:
        if src is not None:
            src.close()
    if tap is not None:
        tap.closed(None)
    # the index follows its bundle: a bundle without an index is only not reused from
    write_atomic_text(frames_index_path(out), json.dumps({"level": level, "frames": frames,
                                                          "tar": _identity(out)}))
    return stats


def _late_keys(frames: list[dict], made: list[tuple], level: int, hashed: dict,
               computed: dict[str, str]) -> None:
    """The keys of frames written before their members' sha256 were known (``hashed``: name
    -> (sha256, its stat when hashed, None if not settled)). A member hashed while it was
    compressed (``computed``) must have the sha256 the manifest has; one that was not,
    the very stat the hash pass saw; else the frame keeps no key (never reused). A member
    listed with its sha256 was checked while compressed."""
    def sha_of(m: tuple) -> str | None:
        if m[4] is not None:
            return m[4]
        sha, seen = hashed.get(m[0], (None, None))
        if m[0] in computed:
            return sha if computed[m[0]] == sha else None
        return sha if seen is not None and tuple(seen) == m[6] else None

    for index, segment, tail in made:
        shas = [sha_of(m) for m in segment]
        if None not in shas:
            frames[index]["key"] = _segment_key(level, [m[:4] + (sha,) for m, sha in
                                                        zip(segment, shas)], tail)


def _alone(segment: list[tuple]) -> bool:
    """A segment that is one large member (a frame of its own)."""
    return len(segment) == 1 and segment[0][3] >= SEGMENT_ALONE


STORED_BLOCK = 128 << 10  # zstd's largest block
STORED_SAMPLES = 3
STORED_RATIO = 0.97  # a sample that compresses to more than this is taken as incompressible


def _stored(source, size: int, level: int) -> bool:
    """Whether a large member's bytes are incompressible (weights, archives, media): blocks
    at its start, middle and end all compress to more than ``STORED_RATIO`` of themselves at
    ``level``. Such a member's frame is stored, not compressed: zstd spent ~0.13 CPU-s on
    100 MB of random bytes to find nothing to gain. A function of the bytes alone, as the
    frame must be."""
    import zstandard

    cctx = zstandard.ZstdCompressor(level=level)
    with open(source, "rb") as fh:
        for i in range(STORED_SAMPLES):
            fh.seek(max(0, size - STORED_BLOCK) * i // (STORED_SAMPLES - 1))
            sample = fh.read(STORED_BLOCK)
            if len(cctx.compress(sample)) <= STORED_RATIO * len(sample):
                return False
    return True


def _frame_start(length: int) -> bytes:
    """A zstd frame header: window 128 KB, the content size (8 bytes), no checksum (the server
    checks every file's sha256, and a stored frame is copied only from a bundle whose stat
    is the one indexed: ``_frame_intact``)."""
    return (b"\x28\xb5\x2f\xfd" + bytes([0xC0, (17 - 10) << 3])
            + length.to_bytes(8, "little"))


def _store_segment(raw, segment: list[tuple], headers: list[bytes], tail: bytes, length: int,
                   computed: dict[str, str] | None = None) -> tuple[int, bool]:
    """``_compress_segment`` for an incompressible member: one zstd frame of raw blocks."""
    source, size = segment[0][1], segment[0][3]
    fh_hash = _hasher(segment[0])
    start = _frame_start(length)
    raw.write(start)
    written = len(start)
    pending = headers[0]
    left = size
    end = tarfile.NUL * (-size % tarfile.BLOCKSIZE) + tail
    with open(source, "rb") as fh:
        while True:
            want = STORED_BLOCK - len(pending)
            chunk = fh.read(min(want, left)) if left > 0 else b""
            if left > 0 and not chunk:
                raise _shrank(source)
            left -= len(chunk)
            if fh_hash is not None:
                fh_hash.update(chunk)
            block = pending + chunk
            pending = b""
            if left == 0:
                room = STORED_BLOCK - len(block)
                block, pending = block + end[:room], end[room:]
                end = b""
            last = left == 0 and not pending
            raw.write((len(block) << 3 | int(last)).to_bytes(3, "little"))
            raw.write(block)
            written += 3 + len(block)
            if last:
                break
    return written, _hash_holds(fh_hash, segment[0], computed)


def _hasher(member: tuple):
    """A sha256 to make while ``member`` is read here, or None: its stat says the hash pass
    made it already (``write_tar``'s ``same``)."""
    return None if len(member) > 5 and member[5] else hashlib.sha256()


def _hash_holds(fh_hash, member: tuple, computed: dict[str, str] | None) -> bool:
    """Whether ``member`` read here has the sha256 it was listed with (``computed`` gets the
    one made here)."""
    if fh_hash is None:
        return True
    digest = fh_hash.hexdigest()
    if computed is not None:
        computed[member[0]] = digest
    return member[4] is None or digest == member[4]


def _shrank(source) -> BundleError:
    return BundleError(f"{source} shrank while the bundle was written; build it again.")


def _compress_segment(cctx, raw, segment: list[tuple], headers: list[bytes], tail: bytes,
                      length: int, computed: dict[str, str] | None = None) -> tuple[int, bool]:
    """Compress one segment as one frame into ``raw``; return its size, and whether every
    member still had the size and sha256 it was listed with (``computed``: gets the sha256
    of each member hashed here)."""
    written = 0
    intact = True

    def emit(chunk: bytes) -> None:
        nonlocal written
        if chunk:
            raw.write(chunk)
            written += len(chunk)

    comp = cctx.compressobj(size=length)
    for header, member in zip(headers, segment):
        source, size = member[1], member[3]
        emit(comp.compress(header))
        fh_hash = _hasher(member)
        left = size
        with open(source, "rb") as fh:
            while left > 0:
                chunk = fh.read(min(CHUNK, left))
                if not chunk:
                    raise _shrank(source)
                left -= len(chunk)
                if fh_hash is not None:
                    fh_hash.update(chunk)
                emit(comp.compress(chunk))
        intact &= _hash_holds(fh_hash, member, computed)
        emit(comp.compress(tarfile.NUL * (-size % tarfile.BLOCKSIZE)))
    emit(comp.compress(tail))
    emit(comp.flush())
    return written, intact


def read_member_by_frame(tar_path: Path, members: list[tuple[str, int]],
                         name: str) -> bytes | None:
    """One member's bytes, decompressing only the frame that holds it; ``members`` are the
    ``(name, size)`` the bundle was written with, in order (they give its segments). None
    when that cannot be done (no index, another layout): the caller checks the sha256."""
    import io

    import zstandard

    try:
        frames = json.loads(frames_index_path(tar_path).read_text())["frames"]
        segments = _segments(stream_order([(n, None, 0, size, None) for n, size in members]))
        if len(segments) != len(frames):
            return None
        frame = next((f for seg, f in zip(segments, frames) if any(m[0] == name for m in seg)),
                     None)
        if frame is None:
            return None
        with open(tar_path, "rb") as fh:
            fh.seek(frame["offset"])
            data = zstandard.ZstdDecompressor().decompressobj().decompress(
                fh.read(frame["length"]))
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for member in tar:
                if member.name == name and member.isfile():
                    return tar.extractfile(member).read()
    except (OSError, ValueError, KeyError, TypeError, tarfile.TarError, zstandard.ZstdError):
        return None
    return None


def check_member(member: tarfile.TarInfo) -> str:
    """Refuse unsafe paths (see paths.safe_relpath), links and devices before anything is
    extracted; return the member's normalised name."""
    try:
        name = safe_relpath(member.name, "the bundle")
    except UnsafePath as exc:
        raise BundleError(str(exc)) from None
    if not (member.isfile() or member.isdir()):
        raise BundleError(f"the bundle holds {name!r}, which is a link or device; refusing it.")
    return name


def damaged(tar_name: str, exc: BaseException) -> BundleError:
    """The one-line error for a tar that cannot be read: an upload on the server (its name
    starts ``stream-``) is sent again by the next deploy; a bundle is rebuilt."""
    if tar_name.startswith("stream-"):
        return BundleError(f"the upload {tar_name} arrived damaged ({exc}); nothing was "
                           "changed: run the deploy again.")
    return BundleError(f"{tar_name} is truncated or corrupted ({exc}); rebuild it with invoke "
                       "build-bundle.")


class _MemberReader:
    """A member's file object whose read errors (bad zstd frame, short tar) are BundleErrors."""

    def __init__(self, fh, tar_name: str):
        self._fh, self._tar_name = fh, tar_name

    def read(self, size: int = -1) -> bytes:
        import zstandard

        try:
            return self._fh.read(size)
        except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as exc:
            raise damaged(self._tar_name, exc) from None


def iter_members(tar_path: Path, raw=None):
    """Yield ``(member, fileobj)`` of a bundle tar, checking each member is safe. ``raw``:
    read the compressed bytes from this file object instead of opening ``tar_path``
    (which then only names it in messages)."""
    import contextlib

    import zstandard

    from remoteops.common.tar_stream import TarStream

    try:
        with (contextlib.nullcontext(raw) if raw is not None else open(tar_path, "rb")) as raw, \
                zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as zr:
            tar = TarStream(zr)
            for member in tar:
                member.name = check_member(member)
                yield member, (_MemberReader(tar.data(member), tar_path.name)
                               if member.isfile() else None)
    except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as exc:
        raise damaged(tar_path.name, exc) from None


