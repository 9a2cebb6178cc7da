"""Server side of ``collect``: the list of files a run produced (agent ``pipeline-files``).

The run directory plus every stage's declared outputs (project-relative files or
folders; the built-in trainer's adapter, a command stage's ``outputs``). A
declared path that leaves the project root, or a link inside one that does, is
reported under ``refused`` and never listed. Each file's sha256 covers exactly
the ``size`` bytes listed, so a file still being appended to gives a consistent
entry. ``now`` is this machine's clock, for ``collect --since``.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from remoteops.common.files import sha256_fileobj


def declared_outputs(stage: dict) -> list[str]:
    """A stage's project-relative outputs, whether recorded as a list or as the older
    ``{"adapter": path, ...}`` mapping (its other entries name files in the run dir)."""
    outs = stage.get("outputs")
    if isinstance(outs, list):
        return [p for p in outs if isinstance(p, str)]
    if isinstance(outs, dict):
        found = [outs["adapter"]] if isinstance(outs.get("adapter"), str) else []
        for key in ("declared", "paths", "files"):
            found += [p for p in outs.get(key) or [] if isinstance(p, str)]
        return found
    return []


def _inside(project: Path, path: Path) -> bool:
    real = Path(os.path.realpath(path))
    return real == project or project in real.parents


def _hash_prefix(path: Path) -> tuple[os.stat_result, str]:
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        return st, sha256_fileobj(fh, limit=st.st_size)[1]


def _walk(top: Path) -> list[Path]:
    if not top.is_dir() or top.is_symlink():
        return [top]
    found = []
    for folder, dirs, files in os.walk(top, followlinks=False):
        dirs.sort()
        found += [Path(folder) / name for name in sorted(files)]
        # a link to a folder is listed like a file, so it is judged below, never walked
        found += [Path(folder) / d for d in dirs if os.path.islink(os.path.join(folder, d))]
    return found


def list_run_files(project: Path, run_dir: Path, state: dict,
                   with_checkpoints: bool = False) -> dict:
    """The listing ``collect`` fetches: run_id, status, now, files, refused."""
    project = Path(os.path.realpath(project))
    refused: list[dict] = []
    tops: list[Path] = [run_dir]
    for stage in state.get("stages", []):
        for rel in declared_outputs(stage):
            path = project / rel
            if os.path.isabs(rel) or ".." in Path(rel).parts or not _inside(project, path):
                refused.append({"stage": stage.get("name"), "path": rel,
                                "reason": "outside the project root"})
                continue
            tops.append(path)
    files, seen = [], set()
    for top in tops:
        for path in _walk(top):
            rel = os.path.relpath(path, project).replace(os.sep, "/")
            if rel in seen or path.name.endswith((".tmp", ".part")) or (
                    not with_checkpoints and "/checkpoints/" in f"/{rel}"):
                continue
            seen.add(rel)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode) and not _inside(project, path):
                refused.append({"path": rel, "reason": "a link leaving the project root"})
                continue
            if rel.startswith("../") or not path.is_file():
                continue
            try:
                st, digest = _hash_prefix(path)
            except (FileNotFoundError, IsADirectoryError):
                continue
            files.append({"path": rel, "size": st.st_size, "mtime": st.st_mtime,
                          "sha256": digest})
    return {"run_id": state.get("run_id"), "status": state.get("status"), "now": time.time(),
            "files": files, "refused": refused}


__all__ = ["list_run_files", "declared_outputs"]
