"""A project whose stage ``live`` trains the tiny demo model on ``data/live``, and a
producer that delivers samples there through the server's real receive path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from remoteops.laptop.sync_source import Sample, write_batch  # noqa: E402
from remoteops.server.data_receive import mark_complete, receive_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

LIVE_STAGE = """
[stages.live]
dataset_live = "data/live"
min_samples = {min_samples}
poll_seconds = 0.05
{extra}
[stages.live.train]
epochs = {epochs}
batch_size = 2
grad_accum = 2
max_seq_len = 96
lora_r = 4
lora_targets = ["q_proj", "v_proj"]
logging_steps = 1
"""


def chat_line(i: int) -> bytes:
    row = {"messages": [{"role": "user", "content": f"What is item {i}?"},
                        {"role": "assistant", "content": f"Item {i} is number {i}."}]}
    return (json.dumps(row) + "\n").encode()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    from remoteops.trainer.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("model") / "demo-model", seed=0,
                            hidden_size=64, vocab_size=400)


def make_live_project(root: Path, model: Path, min_samples: int = 4, epochs: int = 1,
                      extra: str = "") -> Path:
    root.mkdir(parents=True)
    (root / "outputs").mkdir()
    (root / "outputs" / "demo-model").symlink_to(model, target_is_directory=True)
    (root / "remoteops.toml").write_text(
        '[train]\nbase_model = "outputs/demo-model"\nlr = 2e-3\n'
        + LIVE_STAGE.format(min_samples=min_samples, epochs=epochs, extra=extra))
    return root


class Producer:
    """Delivers ``s000.jsonl``... batches into ``<root>/data/live`` as sync-data would."""

    def __init__(self, root: Path, work: Path):
        self.root, self.work, self.sent = root, work, []
        work.mkdir(parents=True, exist_ok=True)

    def deliver(self, first: int, n: int) -> None:
        batch = [Sample(f"s{i:03d}.jsonl", data=chat_line(i), bytes=len(chat_line(i)))
                 for i in range(first, first + n)]
        tar, sha = write_batch(batch, self.work)
        receive_batch(str(self.root), "data/live", str(tar), sha)
        self.sent += [s.id for s in batch]

    def done(self) -> None:
        mark_complete(str(self.root), "data/live")


def consumed(run_dir: Path, stage: str = "live") -> list[dict]:
    path = run_dir / f"live_{stage}.consumed.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def agent(project: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
           "REMOTEOPS_USER_CONFIG": str(project / "no-user-config.toml")}
    return subprocess.Popen([sys.executable, "-m", "remoteops.agent", *args], cwd=project,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


from tests.sync.conftest import noisy_sshd, synced  # noqa: E402,F401 - the sync tests' sshd
