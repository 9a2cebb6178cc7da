"""Choosing an executor: refused in one line before anything starts; a command stage under
torchrun (a Python script really started on 2 ranks; a shell command refused)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.executors.conftest import REPO, agent, run_pipeline, stages_of

STAGE = '\n[stages.s]\ndataset = "data/train8.jsonl"\n'


@pytest.mark.parametrize("extra,expected", [
    ('executor = "torchrn"',
     "stages.s.executor is 'torchrn', which no plugin registers (did you mean 'torchrun'?); "
     "use one of process, slurm, torchrun in remoteops.toml."),
    ("nproc_per_node = 2",
     "stages.s.nproc_per_node is a torchrun setting but the stage runs as a plain process; add "
     "executor = \"torchrun\" to [stages.s] or remove nproc_per_node."),
    ('executor = "torchrun"\nnnodes = 2',
     "stages.s.nnodes is 2: the stage spans 2 machines; start the run on 2 hosts at once "
     "(invoke remote-train --host a,b or --host @GROUP), or set rdzv_endpoint = \"HOST:PORT\" "
     "in [stages.s] and start the other machines yourself."),
    ('executor = "torchrun"\nnproc_per_node = 0', "'stages.s.nproc_per_node' is 0; it must be a "
     "number >= 1"),
])
def test_a_bad_executor_setting_is_refused_in_one_line_before_anything_starts(
        make_project, extra, expected):
    root = make_project(STAGE + extra + "\n")
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "s")
    assert res.returncode != 0
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (root / "outputs").exists()  # no run directory, no process


WORKER = '''import os, sys, time
from pathlib import Path
rank, world = os.environ["RANK"], os.environ["WORLD_SIZE"]
Path(sys.argv[1], f"rank{rank}-of-{world}").write_text(os.environ["REMOTEOPS_STAGE"])
print(f"step 1 loss 2.5 (rank {rank})", flush=True)
'''


def test_a_python_script_runs_on_every_rank_and_a_shell_command_is_refused(make_project):
    root = make_project(f"""
[stages.script]
command = "{sys.executable} worker.py {{run_dir}}"
executor = "torchrun"
nproc_per_node = 2

[stages.shell]
command = "echo hello | tee out.txt"
executor = "torchrun"
nproc_per_node = 2
""")
    (root / "worker.py").write_text(WORKER)
    run, state = run_pipeline(root, "script,shell", timeout=120)
    stages = stages_of(state)
    script, shell = stages["script"], stages["shell"]
    assert script["status"] == "done", (run / "logs" / "script.log").read_text()
    assert sorted(p.name for p in run.glob("rank*")) == ["rank0-of-2", "rank1-of-2"]
    assert (run / "rank1-of-2").read_text() == "script"
    assert shell["status"] == "failed" and shell["failure_class"] == "config"
    assert shell["reason"] == (
        'stage shell: executor "torchrun" starts a Python program, and the command is not one '
        '(write command = "python train.py ...", or keep executor = "process" and call '
        'torchrun inside the command).')
    assert not (root / "out.txt").exists()  # refused before it ran
    assert script["executor"]["name"] == shell["executor"]["name"] == "torchrun"


def test_the_process_executor_is_the_default_and_status_shows_how_each_stage_ran(
        make_project, cli, home, sshd_server):
    from tests.conftest import ssh_alias, trust

    root = make_project(f"""
[stages.plain]
command = "echo step 1 loss 2.0"

[stages.ranks]
command = "{sys.executable} noop.py"
executor = "torchrun"
nproc_per_node = 2
""")
    (root / "noop.py").write_text("pass\n")
    run, state = run_pipeline(root, "plain,ranks", timeout=60)
    plain = stages_of(state)["plain"]
    assert stages_of(state)["ranks"]["status"] == "done"
    assert plain["status"] == "done" and plain["executor"] == {"name": "process"}
    assert "==> bash -c echo step 1 loss 2.0" in (run / "logs" / "plain.log").read_text()
    status = agent(root, "pipeline-status", "--root", str(root), "--json")
    assert '"executor": {"name": "process"}' in status.stdout
    # the laptop's status over SSH: a "run as" column
    ssh_alias(home, "box", sshd_server)
    trust(root, sshd_server)
    res = cli("status", "--host", "box", env={"REMOTEOPS_REMOTE_PYTHON": sys.executable,
                                              "TRAIN_SYNC_PROJECT_ROOT": str(root)})
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in res.stdout.splitlines() if line.startswith("│")}
    assert "run as" in res.stdout
    assert rows["plain"][3] == "process" and rows["ranks"][3] == "torchrun 2x1"


PLUGIN = '''from remoteops.api import Executor, hookimpl


class Stamped(Executor):
    name = "stamped"

    def _wrap(self, launch):
        return ["env", "STAMPED=yes", *launch.argv]


@hookimpl
def register_executors(register):
    register("stamped", Stamped)
'''


def test_a_project_plugin_registers_an_executor_that_runs_a_stage(make_project):
    root = make_project('\n[stages.mine]\ncommand = "echo stamped=$STAMPED"\nexecutor = "stamped"\n'
                        '\n[stages.typo]\ncommand = "true"\nexecutor = "stampd"\n')
    (root / "plugins").mkdir()
    (root / "plugins" / "stamping.py").write_text(PLUGIN)
    run, state = run_pipeline(root, "mine", timeout=60)
    mine = stages_of(state)["mine"]
    assert mine["status"] == "done" and mine["executor"] == {"name": "stamped"}
    log = (run / "logs" / "mine.log").read_text()
    assert "==> env STAMPED=yes bash -c echo stamped=$STAMPED" in log
    assert "\nstamped=yes\n" in log
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "typo")
    assert res.returncode != 0 and \
        "use one of process, slurm, stamped, torchrun in remoteops.toml." \
        in res.stdout + res.stderr


def test_the_laptop_refuses_an_unknown_executor_before_it_deploys(make_project, cli, home,
                                                                   sshd_server, tmp_path):
    from tests.conftest import ssh_alias, trust

    root = make_project(STAGE + 'executor = "torchrn"\n')
    ssh_alias(home, "box", sshd_server)
    trust(root, sshd_server)
    server_root = tmp_path / "server" / "proj"
    res = cli("remote-train", "--host", "box", "--stages", "s", "--yes",
              env={"REMOTEOPS_REMOTE_PYTHON": sys.executable, "REMOTEOPS_GPU_GATE": "warn",
                   "TRAIN_SYNC_PROJECT_ROOT": str(server_root)})
    assert res.returncode != 0
    assert res.stdout.splitlines()[-1] == \
        "  - s: train on data/train8.jsonl (preset standard) under torchrn"
    assert res.stderr.strip() == (
        "error: stages.s.executor is 'torchrn', which no plugin registers (did you mean "
        "'torchrun'?); use one of process, slurm, torchrun in remoteops.toml.")
    assert not (server_root / ".remoteops").exists()  # nothing deployed, nothing started


SLEEPER = '''import os, sys, time
from pathlib import Path
Path(sys.argv[1], "pid-rank" + os.environ["RANK"]).write_text(str(os.getpid()))
time.sleep(120)
'''


def test_cancel_stops_torchrun_and_every_rank(make_project):
    import os
    import time

    root = make_project(f"""
[stages.sleepy]
command = "{sys.executable} sleeper.py {{run_dir}}"
executor = "torchrun"
nproc_per_node = 2
""")
    (root / "sleeper.py").write_text(SLEEPER)
    res = agent(root, "pipeline-start", "--root", str(root), "--stages", "sleepy")
    assert res.returncode == 0, res.stdout + res.stderr
    run = sorted((root / "outputs" / "training_sync").glob("run_*"))[-1]
    deadline = time.monotonic() + 60
    while len(list(run.glob("pid-rank*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = [int(p.read_text()) for p in run.glob("pid-rank*")]
    launcher = json.loads((run / "state.json").read_text())["stages"][0]["process"]["pid"]
    assert len(pids) == 2
    res = agent(root, "pipeline-cancel", "--root", str(root), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    for pid in [launcher, *pids]:  # torchrun and both ranks: gone (not even zombies of ours)
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
    stage = stages_of(json.loads((run / "state.json").read_text()))["sleepy"]
    assert stage["status"] == "cancelled"


def test_torchrun_arguments_for_one_machine_several_machines_and_the_gpus_it_sees(monkeypatch):
    from remoteops.executors import Launch
    from remoteops.plugins import executor_for, get_plugin_manager

    pm = get_plugin_manager(REPO)
    launch = Launch("st", "train", ["py", "-m", "remoteops.agent", "train"], python="py",
                    module="remoteops.agent", args=["train"])

    def argv(**table):
        return executor_for(pm, {"stages": {"st": {"executor": "torchrun", **table}}},
                            "st").wrap(launch)

    # no nvidia-smi involved: CUDA_VISIBLE_DEVICES decides what a process would see
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert argv() == ["py", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                      "--nproc_per_node", "3", "-m", "remoteops.agent", "train"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert argv()[argv().index("--nproc_per_node") + 1] == "1"  # no GPU: one process
    assert argv(nnodes=2, rdzv_endpoint="10.0.0.1:29500", nproc_per_node=4) == [
        "py", "-m", "torch.distributed.run", "--nnodes", "2", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "10.0.0.1:29500", "--rdzv_id", "remoteops-st", "--nproc_per_node",
        "4", "-m", "remoteops.agent", "train"]
