"""The plugin API is one module, ``remoteops.api``; the built-in plugins use only it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"remoteops", "remoteops.api"}


def _remoteops_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "remoteops":
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "remoteops"]
    return found


def test_builtin_plugins_import_only_the_plugin_api():
    plugins = sorted((ROOT / "plugins").glob("*.py"))
    assert len(plugins) >= 5
    offenders = {p.name: sorted(set(_remoteops_imports(p)) - ALLOWED) for p in plugins}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_every_api_name_resolves_and_the_module_alone_loads_no_torch():
    code = """
import json, sys
import remoteops.api as api
light = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "llama_cpp"))
resolved = {name: type(getattr(api, name)).__name__ for name in api.__all__}
print(json.dumps({"light": light, "resolved": resolved}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    data = json.loads(out)
    assert data["light"] == []
    assert {"hookimpl", "Check", "CheckResult", "score_items", "quant_section",
            "run_health_rules"} <= set(data["resolved"])


def test_an_unknown_name_lists_the_api():
    import remoteops.api as api

    with pytest.raises(AttributeError, match="the plugin API is: .*Check"):
        api.not_a_name  # noqa: B018
