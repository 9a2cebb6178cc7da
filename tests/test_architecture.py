"""The architecture holds: the import contracts (pyproject's [tool.importlinter], see
ARCHITECTURE.md) are kept, and the laptop's commands run where torch cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# What only the [train] and [quant] extras bring; only remoteops.trainer and remoteops.quant
# may import it.
TORCH_SIDE = ("torch", "transformers", "peft", "bitsandbytes", "llama_cpp")

# Python imports ``sitecustomize`` at start-up: this one hides the packages above from every
# finder, so ``import torch`` fails exactly as on a laptop without them (find_spec says None),
# in this process and in every Python it starts (the local target's agent too).
BLOCKER = f"""
import sys

BLOCKED = set({TORCH_SIDE!r})


class _Hide:
    def __init__(self, inner):
        self._inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        find = getattr(self._inner, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
"""


def test_import_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    res = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "broken" in res.stdout and " 0 broken" in res.stdout


def _no_torch_env(tmp_path: Path) -> dict:
    folder = tmp_path / "no-torch"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    # the local target's agent runs in this same (blocked) environment
    return {"PYTHONPATH": path, "REMOTEOPS_REMOTE_PYTHON": sys.executable}


def _clean(res: subprocess.CompletedProcess) -> str:
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    return out


def test_the_blocker_blocks(tmp_path):
    env = dict(os.environ, **_no_torch_env(tmp_path))
    for name in TORCH_SIDE:
        res = subprocess.run([sys.executable, "-c", f"import {name}"], env=env,
                             capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 1 and f"No module named '{name}'" in res.stderr


def test_laptop_commands_run_without_torch(cli, project, tmp_path):
    env = _no_torch_env(tmp_path)
    server = tmp_path / "server-root"
    where = ("--host", "local", "--project-root", str(server))

    res = cli("--help", env=env)
    assert res.returncode == 0 and "ModuleNotFoundError" not in _clean(res)
    res = cli("init", env=env)
    assert res.returncode == 0 and "ModuleNotFoundError" not in _clean(res)
    with open(project / "remoteops.toml", "a") as fh:
        fh.write('\n[stages.hello]\ncommand = "echo loss=1.0"\n')
    (project / "train.py").write_text("print('hi')\n")

    # precheck runs; the server side reports the missing packages as checks, not a crash
    res = cli("precheck", *where, "--json", env=env)
    _clean(res)
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["package torch"]["status"] == "fail"
    assert "No module named 'torch'" in checks["package torch"]["value"]

    res = cli("deploy-bundle", "--help", env=env)
    assert res.returncode == 0 and "ModuleNotFoundError" not in _clean(res)
    res = cli("deploy-bundle", *where, "--yes", env=env)
    assert res.returncode == 0 and "ModuleNotFoundError" not in _clean(res)
    assert (server / "train.py").read_text() == "print('hi')\n"

    res = cli("remote-train", *where, "--yes", "--stages", "hello", env=env, timeout=300)
    assert res.returncode == 0 and "ModuleNotFoundError" not in _clean(res)
    res = cli("status", *where, "--json", env=env)
    assert res.returncode == 0 and "ModuleNotFoundError" not in _clean(res)
    assert json.loads(res.stdout)["status"] == "done"
    res = cli("collect", *where, env=env)
    assert res.returncode == 0 and "ModuleNotFoundError" not in _clean(res)
    assert list((project / "outputs" / "training_sync").glob("run_*/TRAINING_SUMMARY.md"))
