"""A wheel of the installed remoteops, so the server runs exactly the laptop's toolkit.

Written by hand rather than with a build backend because it must work from
any install (editable checkout or a wheel from PyPI, where no source tree
exists) and be byte-for-byte reproducible so bundles stay deterministic.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
import zipfile
from pathlib import Path

from remoteops import __version__
from remoteops.common.files import atomic_output, stat_key, write_atomic_text

_EPOCH = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = {"__pycache__"}


def _package_files() -> list[tuple[str, Path]]:
    from remoteops.common.builtin_plugins import builtin_dir

    package = Path(__file__).resolve().parents[1]  # the remoteops package (this is laptop/)
    out: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if name.endswith((".pyc", ".pyo")):
                continue
            path = Path(folder) / name
            out.append(("remoteops/" + path.relative_to(package).as_posix(), path))
    shipped = {arc for arc, _ in out}
    plugins = builtin_dir()
    for path in sorted(plugins.glob("*.py")):
        arc = f"remoteops/_builtin_plugins/{path.name}"
        if arc not in shipped:
            out.append((arc, path))
    return sorted(out)


def _dist_info() -> Path | None:
    """The installed remoteops's ``.dist-info`` folder: the first ``sys.path`` entry that
    holds one, as ``importlib.metadata`` finds it. Looked up by hand because importing
    ``importlib.metadata`` (and the ``email`` package it pulls in) took ~20 ms of every
    deploy's start, in line before its first byte; the library stays the fallback."""
    for entry in sys.path:
        try:
            with os.scandir(entry or ".") as found:
                for item in found:
                    name, _, rest = item.name.partition("-")
                    if rest.endswith(".dist-info") and name.lower() == "remoteops" \
                            and item.is_dir():
                        return Path(item.path)
        except OSError:
            continue  # not a folder (a zip), or unreadable
    return None


def _metadata() -> dict[str, str]:
    meta = entry_points = ""
    dist_info = _dist_info()
    if dist_info is not None:
        meta, entry_points = (_read_text(dist_info / name) for name in ("METADATA",
                                                                        "entry_points.txt"))
    else:
        import importlib.metadata

        try:
            dist = importlib.metadata.distribution("remoteops")
            meta = dist.read_text("METADATA") or ""
            entry_points = dist.read_text("entry_points.txt") or ""
        except importlib.metadata.PackageNotFoundError:
            pass
    if not meta:
        meta = f"Metadata-Version: 2.1\nName: remoteops\nVersion: {__version__}\n"
    return {"METADATA": meta, "entry_points.txt": entry_points,
            "WHEEL": "Wheel-Version: 1.0\nGenerator: remoteops\nRoot-Is-Purelib: true\n"
                     "Tag: py3-none-any\n"}


def _read_text(path: Path) -> str:
    """As ``Distribution.read_text``: the text, or "" when the file is missing."""
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ""


def _record_line(arc: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arc},sha256={digest},{len(data)}"


RACY_NS = 3 * 10**9  # as HashCache: a file changed this recently may change again unseen


def _stat_key(path: Path) -> list[int]:
    return list(stat_key(path.stat()))


def _inputs_key(files: list[tuple[str, Path]], metadata: dict[str, str]) -> list | None:
    """What the wheel's bytes depend on, by stat (None: a file changed too recently)."""
    now = time.time_ns()
    key: list = [__version__, [[name, text] for name, text in sorted(metadata.items())]]
    for arc, src in files:
        stat = _stat_key(src)
        if now - max(stat[1], stat[2]) < RACY_NS:
            return None
        key.append([arc, *stat])
    return key


def build_toolkit_wheel(out_dir: Path) -> Path:
    """Write ``remoteops-<version>-py3-none-any.whl`` into ``out_dir`` (deterministic).

    The wheel already there is kept when no packaged file changed since it was written
    (by size, mtime, ctime and inode, kept beside it in ``<wheel>.inputs.json``), as the
    bundle's hash cache keeps a file's sha256: zipping the package is most of what a
    one-file redeploy spends on the toolkit. A project's first bundle copies the same
    wheel from the user's cache (``user_cache_dir()/toolkit``, kept the same way) when
    another project made it: zipping it is ~0.05 s before a first deploy's first byte."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"remoteops-{__version__}-py3-none-any.whl"
    files, metadata = _package_files(), _metadata()
    key = _inputs_key(files, metadata)
    if key is not None and _kept(path, key):
        return path
    shared = _shared_dir() / path.name
    if key is None or not _kept(shared, key) or not _copy_kept(shared, path, key):
        _write_wheel(path, files, metadata)
        if key is not None:
            _keep(path, key)
            _copy_kept(path, shared, key)
    return path


def _inputs_path(wheel: Path) -> Path:
    return wheel.with_name(wheel.name + ".inputs.json")


def _kept(wheel: Path, key: list) -> bool:
    """``wheel`` is the one made from these inputs, untouched since."""
    try:
        return json.loads(_inputs_path(wheel).read_text()) == {"inputs": key,
                                                              "wheel": _stat_key(wheel)}
    except (OSError, ValueError):
        return False


def _keep(wheel: Path, key: list) -> None:
    try:
        write_atomic_text(_inputs_path(wheel), json.dumps({"inputs": key,
                                                           "wheel": _stat_key(wheel)}))
    except OSError:
        pass  # only a cache


def _copy_kept(source: Path, dest: Path, key: list) -> bool:
    """``source`` copied to ``dest`` (atomically) and recorded as made from ``key``; False
    when that could not be done (a cache only: the caller writes the wheel)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = source.read_bytes()
        if not _kept(source, key):
            return False  # changed while read
        with atomic_output(dest) as out:
            out.write(data)
    except OSError:
        return False
    _keep(dest, key)
    return True


def _shared_dir() -> Path:
    from remoteops.common.files import user_cache_dir

    return user_cache_dir() / "toolkit"


def _write_wheel(path: Path, files: list[tuple[str, Path]], metadata: dict[str, str]) -> None:
    dist_info = f"remoteops-{__version__}.dist-info"
    entries: list[tuple[str, bytes]] = [(arc, src.read_bytes()) for arc, src in files]
    entries += [(f"{dist_info}/{name}", text.encode()) for name, text in metadata.items()
                if text]
    record = [_record_line(arc, data) for arc, data in entries] + [f"{dist_info}/RECORD,,"]
    entries.append((f"{dist_info}/RECORD", ("\n".join(record) + "\n").encode()))
    with atomic_output(path) as out, \
            zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arc, data in entries:
            info = zipfile.ZipInfo(arc, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
