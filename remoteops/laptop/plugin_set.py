"""The plugin set a bundle records (``name==version``), kept while nothing that decides it moved.

Loading the plugins for it (pluggy, ``importlib.metadata`` scanning every installed
distribution's entry points, and executing each plugin file) cost a redeploy 70-120 ms
of its start on the laptop, for the same short list every time. It is kept in
``<bundles>/.plugins.json`` under a key of everything it depends on: the toolkit's
version and its built-in plugin files, each ``sys.path`` folder's mtime (installing or
removing a distribution adds or removes its ``.dist-info`` there), the project's plugins
folder (each file's name, size and mtime) and the environment that blocks plugins or
entry points. Any change there loads the plugins again, as before; so does a failed
load, which raises as it always did.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import remoteops
from remoteops.common.files import write_atomic_text


def _files(folder: Path) -> list:
    try:
        return sorted([e.name, e.stat().st_size, e.stat().st_mtime_ns]
                      for e in os.scandir(folder) if e.is_file())
    except OSError:
        return []


def _key(project: Path, plugins_dir: str) -> str:
    package = Path(remoteops.__file__).resolve().parent
    folders = []
    for entry in sys.path:
        try:
            folders.append([entry, os.stat(entry or ".").st_mtime_ns])
        except OSError:
            continue
    mine = Path(plugins_dir)
    mine = mine if mine.is_absolute() else project / mine
    body = [remoteops.__version__, _files(package / "_builtin_plugins"),
            _files(package.parent / "plugins"), folders, str(mine), _files(mine),
            [os.environ.get(k) for k in ("REMOTEOPS_BLOCK_PLUGINS", "REMOTEOPS_NO_ENTRYPOINTS")],
            bool(getattr(sys, "_called_from_test", False))]
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()


def plugin_set(project: Path, plugins_dir: str, cache: Path) -> list[str]:
    """The plugin set of ``project`` (``PluginManager.requirements``), from ``cache`` when it
    holds for the key above."""
    key = _key(project, plugins_dir)
    try:
        held = json.loads(cache.read_text())
        if held.get("key") == key and isinstance(held.get("plugins"), list):
            return list(held["plugins"])
    except (OSError, ValueError, AttributeError):
        pass
    from remoteops.plugins import get_plugin_manager

    plugins = get_plugin_manager(project, plugins_dir).requirements()
    try:
        write_atomic_text(cache, json.dumps({"key": key, "plugins": plugins}))
    except OSError:
        pass  # only a cache
    return plugins


__all__ = ["plugin_set"]
