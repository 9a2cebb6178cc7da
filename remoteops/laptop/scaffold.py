"""``remoteops init``: a starter remoteops.toml and a two-line tasks.py."""

from __future__ import annotations

from pathlib import Path

from remoteops.common.errors import RemoteOpsError

TASKS_PY = """from remoteops.laptop.tasks import make_namespace  # every remoteops task; see: invoke --list
ns = make_namespace()
"""

STARTER_TOML = """# remoteops settings for this project. 'invoke config' shows every setting and
# where its value comes from. Never put passwords here: use an SSH key or ssh-agent.

# Where the project lives on the server (env TRAIN_SYNC_PROJECT_ROOT, --project-root).
# project_root = "/root/{name}"

# The host used when --host is not given: "local", a [hosts] name, or an ssh alias.
default_host = "local"

# The server's Python (a venv or conda env path works too).
remote_python = "python3"

# GPU gate: strict (a driver problem fails precheck), warn, or off.
gpu_gate = "strict"

# [hosts.gpu]
# host = "gpu.example.com"
# port = 2222
# user = "root"
# identity_file = "~/.ssh/id_ed25519"
# project_root = "/root/{name}"

[precheck]
min_disk_gb = 20

# [stages.style]
# dataset = "data/style.jsonl"
"""


def init_project(folder: Path, force: bool = False) -> list[str]:
    folder = folder.resolve()
    if not folder.is_dir():
        raise RemoteOpsError(f"{folder} is not a folder; create it first or pass --path.")
    files = {"remoteops.toml": STARTER_TOML.format(name=folder.name), "tasks.py": TASKS_PY}
    existing = [n for n in files if (folder / n).exists()]
    if existing and not force:
        raise RemoteOpsError(f"{', '.join(existing)} already exist in {folder}; nothing was "
                             "written (pass --force to overwrite).")
    lines = []
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
        lines.append(f"wrote {folder / name}")
    lines.append("next: edit remoteops.toml, then run 'invoke precheck'")
    return lines


def init_demo(folder: Path) -> list[str]:
    """The demo project (tiny Qwen3 model, demo data) in ``folder``; safe to run again."""
    from remoteops.trainer.demo_model import DEMO_DIR, build_demo_model

    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for src in sorted(DEMO_DIR.rglob("*")):
        rel = src.relative_to(DEMO_DIR)
        dest = folder / rel
        if src.is_dir() or "__pycache__" in rel.parts or dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())
        lines.append(f"wrote {dest}")
    if not (folder / "tasks.py").exists():
        (folder / "tasks.py").write_text(TASKS_PY, encoding="utf-8")
        lines.append(f"wrote {folder / 'tasks.py'}")
    model = folder / "outputs" / "demo-model"
    if not (model / "config.json").is_file():
        build_demo_model(model, seed=0, data_files=sorted((folder / "data").glob("*.jsonl")))
        lines.append(f"built the tiny demo model in {model}")
    lines.append(f"demo project ready in {folder}; next: cd {folder} && invoke remote-train --yes")
    return lines
