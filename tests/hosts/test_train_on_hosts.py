"""remote-train on two real sshd hosts at once, each with its own learning rate
([hosts.NAME.overrides]); status/runs in one table; collect into outputs/<host>/."""

from __future__ import annotations

import json
from pathlib import Path


from tests.hosts.conftest import ENV, keyed, write_project
from tests.harness.demo import DEMO, head_lines


TRAIN = """
[train]
base_model = "{model}"
lr = 2e-3
epochs = 1
grad_accum = 2
max_seq_len = 96
lora_r = 4
lora_alpha = 8
lora_targets = ["q_proj"]

[health]
heartbeat_seconds = 1.0

[eval]
max_new_tokens = 2

[pipeline]
stages = ["style", "collect"]
heartbeat_seconds = 0.5
poll_seconds = 0.3

[stages.style]
dataset = "data/style.jsonl"
eval_set = "data/eval.jsonl"
"""




def run_settings(root: Path, run_id: str) -> dict:
    saved = json.loads((root / "outputs" / "training_sync" / run_id / "settings.json")
                       .read_text())
    return saved["values"] if "values" in saved else saved


def test_two_hosts_train_with_their_own_overrides_and_collect_apart(
        cli, project, servers, roots, tiny_model):
    head_lines(DEMO / "data" / "style.jsonl", project / "data" / "style.jsonl", 4)
    head_lines(DEMO / "data" / "eval" / "style.jsonl", project / "data" / "eval.jsonl", 1)
    write_project(project, servers[:2], roots, TRAIN.format(model=tiny_model)
                  + '\n[groups.pair]\nhosts = ["h1", "h2"]\n',
                  extra={"h1": "overrides.train.lr = 1e-3\n",
                         "h2": "[hosts.h2.overrides.train]\nlr = 5e-3\n"})
    res = cli("remote-train", "--host", "@pair", "--yes", env=ENV, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "h1: overrides train.lr = 0.001" in res.stdout
    assert "[h1] started run_" in res.stdout and "[h2] started run_" in res.stdout
    assert "== h1: ok" in res.stdout and "== h2: ok" in res.stdout

    status = keyed(cli("status", "--host", "@pair", "--json", env=ENV).stdout)
    for host, lr in (("h1", 1e-3), ("h2", 5e-3)):
        data = status[host]["result"]
        assert data["status"] == "done", data
        assert data["options"]["overrides"] == {"train.lr": lr}
        saved = run_settings(roots[host], data["run_id"])
        assert saved["train"]["lr"] == lr  # what the trainer read
        local = project / "outputs" / host
        run = local / "training_sync" / data["run_id"]
        assert (run / "TRAINING_SUMMARY.md").is_file() and (run / "state.json").is_file()
        adapter = local / "adapter" / "adapter_style" / "adapter_model.safetensors"
        assert adapter.read_bytes() == (roots[host] / "outputs" / "adapter" / "adapter_style" /
                                        "adapter_model.safetensors").read_bytes()
    assert not (project / "outputs" / "training_sync").exists()  # nothing in the one-host place

    table = cli("status", "--host", "h1,h2", env=ENV).stdout
    assert "host" in table and "train.lr=0.001" in table and "train.lr=0.005" in table
    runs = cli("runs", "--host", "h1,h2", env=ENV)
    assert runs.returncode == 0
    assert runs.stdout.count(status["h1"]["result"]["run_id"]) >= 1 and "h2" in runs.stdout

    again = cli("collect", "--host", "@pair", "--json", env=ENV)
    assert again.returncode == 0, again.stderr
    assert all(v["result"]["fetched"] == [] for v in keyed(again.stdout).values())
    cancelled = keyed(cli("cancel", "--host", "h1,h2", "--json", env=ENV).stdout)
    assert {h: (v["result"]["run_id"], v["result"]["status"]) for h, v in cancelled.items()} \
        == {h: (status[h]["result"]["run_id"], "done") for h in ("h1", "h2")}  # ended already
    one = cli("collect", "--host", "h1", env=ENV)  # one host: today's layout
    assert one.returncode == 0, one.stderr
    assert (project / "outputs" / "training_sync" / status["h1"]["result"]["run_id"]).is_dir()
