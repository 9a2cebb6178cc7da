"""A wheel of the installed remoteops, so the server runs exactly the laptop's toolkit.

Written by hand rather than with a build backend because it must work from
any install (editable checkout or a wheel from PyPI, where no source tree
exists) and be byte-for-byte reproducible so bundles stay deterministic.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import time
import zipfile
from pathlib import Path

from remoteops import __version__
from remoteops.common.files import atomic_output, stat_key, write_atomic_text

_EPOCH = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = {"__pycache__"}


def _package_files() -> list[tuple[str, Path]]:
    from remoteops.plugins import builtin_dir

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


def _metadata() -> dict[str, str]:
    try:
        dist = importlib.metadata.distribution("remoteops")
        meta = dist.read_text("METADATA") or ""
        entry_points = dist.read_text("entry_points.txt") or ""
    except importlib.metadata.PackageNotFoundError:
        meta, entry_points = "", ""
    if not meta:
        meta = f"Metadata-Version: 2.1\nName: remoteops\nVersion: {__version__}\n"
    return {"METADATA": meta, "entry_points.txt": entry_points,
            "WHEEL": "Wheel-Version: 1.0\nGenerator: remoteops\nRoot-Is-Purelib: true\n"
                     "Tag: py3-none-any\n"}


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
    one-file redeploy spends on the toolkit."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"remoteops-{__version__}-py3-none-any.whl"
    files, metadata = _package_files(), _metadata()
    key = _inputs_key(files, metadata)
    inputs = path.with_name(path.name + ".inputs.json")
    try:
        if key is not None and json.loads(inputs.read_text()) == {"inputs": key,
                                                                 "wheel": _stat_key(path)}:
            return path
    except (OSError, ValueError):
        pass
    _write_wheel(path, files, metadata)
    if key is not None:
        try:
            write_atomic_text(inputs, json.dumps({"inputs": key, "wheel": _stat_key(path)}))
        except OSError:
            pass  # only a cache
    return path


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
