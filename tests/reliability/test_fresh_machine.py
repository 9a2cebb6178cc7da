"""Section 0 of the hardening issue: the test command and the benchmarks on a fresh machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_deploy_without_rsync_stops_with_one_line(tmp_path):
    # A PATH with Python but no rsync/ssh/scp and no apt-get: the benchmark must stop with a
    # one-line message naming what to install, not a FileNotFoundError traceback.
    bare = tmp_path / "bin"
    bare.mkdir()
    env = dict(os.environ, PATH=str(bare))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "bench" / "bench_deploy.py"),
                           "--repeats", "1"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "rsync" in lines[0] and "apt-get install" in lines[0]


def test_constraints_pin_every_installed_distribution():
    # The test environment installs exact versions: every line of constraints.txt is
    # name==version, and the packages the suite leans on are pinned there.
    lines = [l.split("#")[0].strip() for l in (REPO / "constraints.txt").read_text().splitlines()]
    pins = dict(l.split("==", 1) for l in lines if l)
    assert all(v and "," not in v and "*" not in v for v in pins.values()), pins
    names = {n.lower().replace("_", "-") for n in pins}
    for needed in ("transformers", "peft", "llama-cpp-python", "fabric", "paramiko", "pytest",
                   "hypothesis", "bitsandbytes", "tokenizers", "accelerate", "numpy"):
        assert needed in names, needed


def test_ci_and_readme_install_with_the_constraints():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text().splitlines()
    first_block = readme[readme.index("```bash") + 1: readme.index("```bash") + 3]
    assert "-c constraints.txt" in first_block[1], first_block
    assert first_block[1].split("&&")[-1].strip() == ".venv/bin/invoke test"
    assert first_block[1] in ci


def test_latest_reports_only_real_version_moves():
    sys.path.insert(0, str(REPO))
    import tasks

    moved = tasks._moved_pins("# pins\ntorch==2.13.0\nTransformers==5.24.0\npeft==0.21.0\n",
                              "torch==2.13.0+cpu\ntransformers==5.30.1\npeft==0.21.0\n"
                              "newpkg==1.0\n")
    assert moved == ["transformers 5.24.0 -> 5.30.1"]
