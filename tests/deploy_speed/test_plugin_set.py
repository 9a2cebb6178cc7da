"""The plugin set a bundle records is kept (laptop/plugin_set) and still follows every change:
a plugin file added, changed or removed, and a plugin blocked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from remoteops.laptop.plugin_set import plugin_set
from remoteops.plugins import get_plugin_manager

EXAMPLE = Path(__file__).resolve().parents[1] / "plugins" / "hf_cache.py"


def fresh(project: Path) -> list[str]:
    return get_plugin_manager(project, "plugins").requirements()


def test_the_kept_plugin_set_follows_every_change(project, monkeypatch):
    cache = project / "bundles" / ".plugins.json"
    first = plugin_set(project, "plugins", cache)
    assert first == fresh(project) and "gpu_gate==0.1.0" in first
    assert json.loads(cache.read_text())["plugins"] == first
    # kept: a loader that must not run proves it is not consulted
    monkeypatch.setattr("remoteops.plugins.get_plugin_manager", None)
    assert plugin_set(project, "plugins", cache) == first
    monkeypatch.undo()

    (project / "plugins").mkdir()
    shutil.copy(EXAMPLE, project / "plugins" / "hf_cache.py")
    added = plugin_set(project, "plugins", cache)
    assert added == fresh(project) and "hf_cache==0" in added
    source = (project / "plugins" / "hf_cache.py")
    source.write_text(source.read_text() + '\n__version__ = "2.0"\n')
    assert "hf_cache==2.0" in plugin_set(project, "plugins", cache)
    monkeypatch.setenv("REMOTEOPS_BLOCK_PLUGINS", "gpu_gate")
    blocked = plugin_set(project, "plugins", cache)
    assert blocked == fresh(project) and "gpu_gate==0.1.0" not in blocked
    monkeypatch.delenv("REMOTEOPS_BLOCK_PLUGINS")
    source.unlink()
    assert plugin_set(project, "plugins", cache) == first
