"""Checkpoints of a stage: listing (with sizes, best/latest) and resume lookup. No torch."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from remoteops.common.errors import ConfigError
from remoteops.common.rundir import run_dirs

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def is_complete(path: Path) -> bool:
    """A checkpoint a resume can use: the trainer state (written last) and optimizer state."""
    return (path / "trainer_state.json").is_file() and any(path.glob("optimizer.*"))


def list_checkpoints(ckpt_dir: Path) -> list[dict[str, Any]]:
    """Checkpoints under ``ckpt_dir``, oldest first, each with step, epoch, size, best, latest."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        m = _CKPT.match(path.name)
        if m and path.is_dir():
            found.append((int(m.group(1)), path))
    found.sort()
    out = []
    best_name = None
    for step, path in found:
        info: dict[str, Any] = {"path": str(path), "name": path.name, "step": step,
                                "size": dir_size(path), "complete": is_complete(path),
                                "epoch": None, "eval_loss": None, "best": False, "latest": False}
        state_file = path / "trainer_state.json"
        if state_file.is_file():
            try:
                state = json.loads(state_file.read_text(encoding="utf-8"))
            except ValueError:
                state = {}
            info["epoch"] = state.get("epoch")
            evals = [e["eval_loss"] for e in state.get("log_history", []) if "eval_loss" in e
                     and e.get("step") == step]
            info["eval_loss"] = evals[-1] if evals else None
            if state.get("best_model_checkpoint"):
                best_name = Path(state["best_model_checkpoint"]).name
        out.append(info)
    complete = [c for c in out if c["complete"]]
    if complete:
        complete[-1]["latest"] = True
    for c in out:
        c["best"] = c["name"] == best_name
    return out


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = [c for c in list_checkpoints(ckpt_dir) if c["complete"]]
    return Path(done[-1]["path"]) if done else None


def find_resume(project_dir: Path, stage: str, spec: str,
                run_dir: Path | None = None) -> tuple[Path, Path]:
    """``(run dir, checkpoint)`` for ``--resume latest|PATH``."""
    if spec and spec != "latest":
        ckpt = Path(spec).expanduser()
        if not ckpt.is_absolute():
            ckpt = (Path.cwd() / ckpt) if (Path.cwd() / ckpt).exists() else project_dir / ckpt
        if not ckpt.is_dir() or not is_complete(ckpt):
            raise ConfigError(f"checkpoint {spec} not found or incomplete (needs trainer_state.json "
                              "and optimizer state); list them with 'remoteops-agent checkpoints "
                              f"--stage {stage}'.")
        ckpt = ckpt.resolve()
        owner = ckpt.parent.parent.parent if ckpt.parent.name == stage else None
        return (run_dir or owner or ckpt.parent), ckpt
    candidates = [run_dir] if run_dir else list(reversed(run_dirs(project_dir)))
    for rd in candidates:
        ckpt = latest_checkpoint(Path(rd) / "checkpoints" / stage)
        if ckpt:
            return Path(rd), ckpt
    where = run_dir or (project_dir / "outputs" / "training_sync")
    raise ConfigError(f"no checkpoint of stage '{stage}' to resume under {where}; start the stage "
                      "without --resume.")
