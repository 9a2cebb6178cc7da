"""remote-train against the real sshd: the detached pipeline, follow, kill, resume, collect."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ssh_alias, trust
from tests.harness.demo import DEMO, head_lines


TOML = """
[train]
base_model = "{model}"
lr = 2e-3
grad_accum = 2
epochs = 2
max_seq_len = 96
lora_r = 8
lora_alpha = 16
lora_targets = ["q_proj", "v_proj"]

[health]
heartbeat_seconds = 1.0

[eval]
max_new_tokens = 6

[pipeline]
heartbeat_seconds = 1.0
poll_seconds = 0.5

[precheck]
min_disk_gb = 0.01
min_ram_gb = 0.1
required_packages = ["click"]
optional_packages = []

[stages.sample]
dataset = "data/sample.jsonl"
eval_set = "data/eval/style.jsonl"

[stages.style]
dataset = "data/style.jsonl"
eval_set = "data/eval/style.jsonl"

[stages.writing]
dataset = "data/writing.jsonl"
eval_set = "data/eval/writing.jsonl"

[stages.all]
dataset = "data/all.jsonl"
eval_set = "data/eval/all.jsonl"
"""




@pytest.fixture
def train_project(project, tiny_model, home, sshd_server) -> Path:
    """A small copy of the demo project (few samples, so stages take seconds)."""
    for name, n in (("sample", 4), ("style", 8), ("writing", 6), ("all", 8)):
        head_lines(DEMO / "data" / f"{name}.jsonl", project / "data" / f"{name}.jsonl", n)
    for name in ("style", "writing", "all"):
        head_lines(DEMO / "data" / "eval" / f"{name}.jsonl", project / "data" / "eval" /
              f"{name}.jsonl", 2)
    (project / "remoteops.toml").write_text(TOML.format(model=tiny_model))
    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)
    return project


@pytest.fixture
def server_root(tmp_path) -> Path:
    return tmp_path / "server" / "proj"


def env(server_root: Path, **extra: str) -> dict:
    return {"REMOTEOPS_REMOTE_PYTHON": sys.executable, "REMOTEOPS_GPU_GATE": "warn",
            "TRAIN_SYNC_PROJECT_ROOT": str(server_root), **extra}


def state_of(server_root: Path, run_id: str | None = None) -> dict:
    runs = sorted((server_root / "outputs" / "training_sync").glob("run_*"))
    run = server_root / "outputs" / "training_sync" / run_id if run_id else runs[-1]
    return json.loads((run / "state.json").read_text())


def wait_for(predicate, timeout: float = 240, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def test_full_pipeline_over_ssh_collects_adapters_and_reports(cli, train_project, server_root):
    res = cli("remote-train", "--host", "box", "--yes", "--skip-sample",
              env=env(server_root), timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "deployed v1" in res.stdout and "summary:" in res.stdout
    state = state_of(server_root)
    assert [(s["name"], s["status"]) for s in state["stages"]] == [
        ("precheck", "done"), ("sample", "skipped"), ("style", "done"), ("writing", "done"),
        ("all", "done"), ("collect", "done")]
    assert state["status"] == "done"
    local = train_project / "outputs"
    for stage in ("style", "writing", "all"):
        adapter = local / "adapter" / f"adapter_{stage}"
        assert (adapter / "adapter_config.json").is_file()
        assert (adapter / "adapter_model.safetensors").stat().st_size > 1000
    run = local / "training_sync" / state["run_id"]
    for name in ("TRAINING_SUMMARY.md", "state.json", "metrics.csv", "summary.json",
                 "eval_report_style.json", "eval_report_writing.json", "eval_report_all.json",
                 "style.done", "style.healthy", "loss_style.png", "loss_all.png"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoints").exists()  # checkpoints stay on the server
    summary = (run / "TRAINING_SUMMARY.md").read_text()
    assert "| style | done |" in summary and "| collect | done |" in summary
    assert "loss_style.png" in summary
    local_state = json.loads((run / "state.json").read_text())
    assert local_state["status"] == "done"
    # hash-verified and idempotent: a second collect fetches nothing
    res = cli("collect", "--host", "box", "--json", env=env(server_root))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["fetched"] == []


def test_nan_stage_stops_the_pipeline_and_later_stages_are_skipped(cli, train_project,
                                                                   server_root):
    with open(train_project / "remoteops.toml", "a") as fh:
        fh.write('\n[stages.style.train]\ninject_fault = "nan@2"\n')
    res = cli("remote-train", "--host", "box", "--yes", "--stages", "style,writing,collect",
              env=env(server_root), timeout=600)
    assert res.returncode == 1
    assert "stage style failed (nan)" in res.stderr and "--resume" in res.stderr
    state = state_of(server_root)
    assert [(s["name"], s["status"]) for s in state["stages"]] == [
        ("style", "failed"), ("writing", "skipped"), ("collect", "skipped")]
    assert state["stages"][0]["attempt"] == 1  # NaN is not retried
    summary = (train_project / "outputs" / "training_sync" / state["run_id"] /
               "TRAINING_SUMMARY.md").read_text()
    stopped = [l for l in summary.splitlines() if l.startswith("**Stopped:**")]
    assert len(stopped) == 1 and "style" in stopped[0] and "nan" in stopped[0]


def test_custom_command_stage_nan_line_is_caught_by_the_log_checker(cli, train_project,
                                                                    server_root):
    script = train_project / "train.sh"
    script.write_text("#!/bin/bash\nfor i in 1 2 3; do echo \"step $i loss: 2.$i\"; sleep 0.2; "
                      "done\necho 'step 4 loss: nan'\nsleep 30\necho never\n")
    with open(train_project / "remoteops.toml", "a") as fh:
        fh.write('\n[stages.mine]\ncommand = "bash train.sh {stage} > /dev/stdout"\n')
    started = time.monotonic()
    res = cli("remote-train", "--host", "box", "--yes", "--stages", "mine",
              env=env(server_root), timeout=300)
    assert res.returncode == 1
    assert time.monotonic() - started < 30  # stopped at the NaN line, not after the sleep
    stage = state_of(server_root)["stages"][0]
    assert stage["status"] == "failed" and stage["failure_class"] == "nan"
    log = (server_root / "outputs" / "training_sync" / state_of(server_root)["run_id"] /
           "logs" / "mine.log").read_text()
    assert "step 2 loss: 2.2" in log and "never" not in log


def _start_detached(cli, server_root, stages, extra=()):
    res = cli("remote-train", "--host", "box", "--yes", "--detach", "--stages", stages, *extra,
              env=env(server_root), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.split("started ")[1].split()[0]


def _cwd(pid: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def test_second_run_is_refused_naming_the_running_one_and_cancel_stops_it(
        cli, train_project, server_root):
    (train_project / "slow.sh").write_text("echo begin; sleep 120; echo end\n")
    with open(train_project / "remoteops.toml", "a") as fh:
        fh.write('\n[stages.slow]\ncommand = "bash slow.sh"\n')
    run_id = _start_detached(cli, server_root, "slow")
    res = cli("remote-train", "--host", "box", "--yes", "--stages", "slow",
              env=env(server_root), timeout=120)
    # refused before deploying anything (the laptop asks first; the server's lock refuses too)
    assert res.returncode == 2 and f"pipeline run {run_id} is live" in res.stderr
    child = wait_for(lambda: [p for p in subprocess.run(
        ["pgrep", "-f", "bash slow.sh"], capture_output=True, text=True).stdout.split()
        if _cwd(p).startswith(str(server_root))])  # not another test's, on a shared machine
    res = cli("cancel", "--host", "box", "--run", run_id, env=env(server_root))
    assert res.returncode == 0 and "cancelled" in res.stdout
    state = state_of(server_root, run_id)
    assert state["status"] == "cancelled" and state["stages"][0]["status"] == "cancelled"
    assert all(not os.path.exists(f"/proc/{pid}") for pid in child)  # children stopped too
    # the lock is free again
    _start_detached(cli, server_root, "precheck")


def test_laptop_side_can_die_and_status_and_logs_reattach(cli, train_project, server_root):
    laptop = subprocess.Popen([sys.executable, "-m", "remoteops", "remote-train", "--host", "box",
                               "--yes", "--stages", "style,collect"], cwd=train_project,
                              env={**os.environ, **env(server_root)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: any(s["name"] == "style" and s["status"] == "running"
                         for s in state_of(server_root)["stages"])
             if (server_root / "outputs" / "training_sync").is_dir() else False)
    laptop.kill()
    laptop.wait()
    run_id = state_of(server_root)["run_id"]
    res = cli("status", "--host", "box", "--json", env=env(server_root))
    assert res.returncode == 0 and json.loads(res.stdout)["status"] == "running"
    res = cli("logs", "--host", "box", "--run", run_id, "--stage", "style", "-f",
              env=env(server_root), timeout=600)
    assert res.returncode == 0
    assert "training stage 'style'" in res.stdout and f"run {run_id} is" in res.stdout
    assert state_of(server_root, run_id)["stages"][0]["status"] == "done"
    res = cli("collect", "--host", "box", "--run", run_id, env=env(server_root))
    assert res.returncode == 0 and "summary:" in res.stdout
    assert (train_project / "outputs" / "adapter" / "adapter_style").is_dir()


def test_killed_runner_is_reported_dead_and_resume_continues_from_the_checkpoint(
        cli, train_project, server_root):
    with open(train_project / "remoteops.toml", "a") as fh:
        fh.write("\n[stages.style.train]\nepochs = 3\n")
    run_id = _start_detached(cli, server_root, "style,collect")
    run = server_root / "outputs" / "training_sync" / run_id
    wait_for(lambda: list((run / "checkpoints" / "style").glob("checkpoint-*/trainer_state.json"))
             if (run / "checkpoints" / "style").is_dir() else False)
    runner_pid = state_of(server_root, run_id)["runner"]["pid"]
    os.kill(runner_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    dead = wait_for(lambda: json.loads(cli("status", "--host", "box", "--json",
                                           env=env(server_root)).stdout)["status"] == "dead",
                    timeout=30, every=0.5)
    assert dead and time.monotonic() - killed_at < 10
    res = cli("status", "--host", "box", env=env(server_root))
    assert res.returncode == 1 and f"--resume {run_id}" in res.stdout
    res = cli("remote-train", "--host", "box", "--yes", "--resume", run_id,
              env=env(server_root), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    state = state_of(server_root, run_id)
    style = state["stages"][0]
    assert style["status"] == "done" and state["status"] == "done"
    log = (run / "logs" / "style.log").read_text()
    assert "resuming stage 'style' from" in log and "checkpoint-" in log
    assert style["attempts"][-1]["resume"] is True


def test_non_interactive_needs_yes_and_env_or_flag_gives_it(cli, train_project, server_root):
    with open(train_project / "remoteops.toml", "a") as fh:
        fh.write('\n[stages.hello]\ncommand = "echo hello from {stage}"\n')
    res = cli("remote-train", "--host", "box", "--stages", "hello", env=env(server_root))
    assert res.returncode == 2 and "add --yes" in res.stderr
    assert not (server_root / "outputs").exists()  # nothing was started
    res = cli("remote-train", "--host", "box", "--stages", "hello",
              env=env(server_root, TRAIN_SYNC_ASSUME_YES="1"), timeout=300)
    assert res.returncode == 0, res.stderr
    # flags beat the environment: --project-root wins over TRAIN_SYNC_PROJECT_ROOT
    other = server_root.parent / "other"
    res = cli("remote-train", "--host", "box", "--stages", "hello", "--yes", "--project-root",
              str(other), env=env(server_root), timeout=300)
    assert res.returncode == 0, res.stderr
    assert (other / "outputs" / "training_sync").is_dir()
    log = next((other / "outputs" / "training_sync").glob("run_*/logs/hello.log")).read_text()
    assert "hello from hello" in log


def test_pipeline_with_the_builtin_plugins_ends_with_a_closure_report(cli, train_project):
    """On the local target (in place): post-eval fixes, GGUF and bitsandbytes checks run after
    the stage's eval, and the run ends with final_closure_report.md."""
    with open(train_project / "remoteops.toml", "a") as fh:
        fh.write('\n[plugins.post_eval_fix]\nenabled = true\nstages = ["style"]\n'
                 'rules = [{ rule = "strip_boilerplate" }, { rule = "close_code_fences" }]\n'
                 '[plugins.quant_gguf]\nenabled = true\nstages = ["style"]\ntypes = ["f16"]\n'
                 'pre_tokenizer = "qwen2"\n'
                 '[plugins.quant_bnb]\nenabled = true\nstages = ["style"]\ntypes = ["int8"]\n')
    res = cli("remote-train", "--host", "local", "--yes", "--stages", "style,collect",
              env={"REMOTEOPS_GPU_GATE": "warn"}, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    run = next((train_project / "outputs" / "training_sync").glob("run_*"))
    report = (run / "final_closure_report.md").read_text()
    for section in ("## Stage `style`", "### Training outcome", "### Eval metrics vs targets",
                    "### Post-eval fixes (before / after)", "### Issue log", "### Quantization",
                    "### Reproduce"):
        assert section in report, section
    quant = json.loads((run / "quant_style.json").read_text())
    assert "f16" in json.dumps(quant) and "int8" in json.dumps(quant)
    assert json.loads((run / "final_closure_report.json").read_text())
