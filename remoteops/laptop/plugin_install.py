"""Install plugin packages into the toolkit's own environment (pip run in-process)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import runpy
import sys
from pathlib import Path

from remoteops.common.errors import RemoteOpsError
from remoteops.plugins import GROUP


def _pip(*args: str) -> tuple[int, str]:
    """Run pip in this interpreter, so the plugin lands where remoteops itself is installed."""
    saved = sys.argv
    out = io.StringIO()
    sys.argv = ["pip", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_module("pip", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return code, out.getvalue()


def _entry_points() -> dict[str, str]:
    importlib.invalidate_caches()
    return {ep.name: dist.metadata["Name"] for dist in importlib.metadata.distributions()
            for ep in dist.entry_points if ep.group == GROUP}


def install_plugin(spec: str, upgrade: bool = False, editable: bool = False) -> list[str]:
    """pip-install ``spec``; return the lines to show (which plugins it added)."""
    path = Path(spec).expanduser()
    target = str(path.resolve()) if path.exists() else spec
    if editable and not path.exists():
        raise RemoteOpsError(f"--editable needs a folder, and {spec} does not exist.")
    before = _entry_points()
    args = ["install", "--disable-pip-version-check", "--no-input"]
    args += ["--upgrade"] if upgrade else []
    args += ["-e", target] if editable else [target]
    code, output = _pip(*args)
    if code != 0:
        last = [l for l in output.strip().splitlines() if l.strip()][-1:] or ["no output"]
        raise RemoteOpsError(f"pip could not install {spec}: {last[0].strip()} (rerun with "
                             f"'{sys.executable} -m pip install {target}' to see everything).")
    after = _entry_points()
    added = sorted(set(after) - set(before)) or sorted(
        n for n in after if Path(spec).name.replace("_", "-") in after[n].replace("_", "-"))
    if not added:
        return [f"installed {spec}, but it declares no entry point in group '{GROUP}'; add "
                f"[project.entry-points.{GROUP}] to its pyproject.toml."]
    return [f"installed plugin {name} (from {after[name]}); 'invoke plugins' lists it."
            for name in added]


def uninstall_plugin(name: str) -> str:
    code, output = _pip("uninstall", "--yes", "--disable-pip-version-check", name)
    if code != 0 or "not installed" in output.lower():
        raise RemoteOpsError(f"pip could not uninstall {name}: is that the package's name? "
                             "'invoke plugins' shows where each plugin came from.")
    return f"uninstalled {name}"
