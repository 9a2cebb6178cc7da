"""bench-executors: what running a stage through an executor adds over running the same
command bare, per stage, as a ratio.

The command is a small Python program that joins a gloo process group, all-reduces a
tensor on every rank and works ``--work`` seconds. Three ways, ``--repeats`` times each
(medians): bare ``python -m torch.distributed.run ... worker.py`` (or bare ``python
worker.py`` for the process executor); the same as a pipeline stage, timed by the stage's
own ``duration_s`` (the executor and the runner's watch); and end to end, from
``pipeline-start`` to the runner's exit (spawn, settings, plugins, state, reports).

The slurm row runs the program (one process) as a batch job: bare is ``sbatch --wait
--wrap "python worker.py"``; as a stage, the slurm executor submits and follows it (one
squeue per ``[slurm] poll_seconds``, here 0.5 s). It uses the cluster ``SLURM_CONF`` names
when one answers, else a private one-node cluster (``tests/harness/slurm.py``, as root),
else it is left out with the reason.

The two chain rows run three such stages in a row. ``slurm chain`` submits them up front
(``[slurm] chain = "upfront"``, the default: three jobs at once, each ``afterok`` on the one
before, each running its stage through the agent's ``stage-job``); ``slurm 3 stages`` submits
them one at a time (``chain = "stage"``). Bare is the same chain of three ``sbatch
--dependency=afterok:<previous> --kill-on-invalid-dep=yes --wrap ...`` jobs submitted by hand
and waited for by asking squeue every 0.5 s (the runner's ``poll_seconds`` here); per stage
is a third of each.

Run: python -m tests.bench.bench_executors [--nproc 2] [--work 2] [--repeats 3] [--only ROWS]
[--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = """import os, sys, time
import torch, torch.distributed as dist
if "RANK" in os.environ:
    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == dist.get_world_size()
time.sleep(float(sys.argv[1]))
if "RANK" in os.environ:
    dist.destroy_process_group()
"""


def _env(root: Path) -> dict:
    env = {**os.environ, "REMOTEOPS_USER_CONFIG": str(root / "none.toml")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _bare(root: Path, argv: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, cwd=root, env=_env(root), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=600)
    return time.monotonic() - started


def _bare_chain(root: Path, command: str, n: int = 3, poll_s: float = 0.5) -> float:
    """A chain of ``n`` afterok jobs submitted by hand, waited for with squeue."""
    started = time.monotonic()
    after = None
    for _ in range(n):
        dep = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
        after = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", *dep, "--wrap",
                                command], cwd=root, env=_env(root), check=True, text=True,
                               capture_output=True, timeout=60).stdout.strip().split(";")[0]
    while True:
        state = subprocess.run(["squeue", "-h", "-t", "all", "-j", after, "-o", "%T"],
                               env=_env(root), capture_output=True, text=True,
                               timeout=30).stdout.strip()
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            assert state == "COMPLETED", state
            return time.monotonic() - started
        time.sleep(poll_s)


def _staged(root: Path, stage: str) -> tuple[float, float]:
    """``(the stages' duration_s summed, pipeline-start to the runner's exit)`` of one run
    of ``stage`` (one name, or several joined by commas)."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "remoteops.agent", "pipeline-start", "--root",
                    str(root), "--stages", stage], cwd=root, env=_env(root), check=True,
                   stdout=subprocess.DEVNULL, timeout=120)
    run = sorted((root / "outputs" / "training_sync").glob("run_*"))[-1]
    while True:
        state = json.loads((run / "state.json").read_text())
        if state.get("runner", {}).get("exited"):
            break
        time.sleep(0.05)
    total = time.monotonic() - started
    entries = [s for s in state["stages"] if s["name"] in stage.split(",")]
    assert all(e["status"] == "done" for e in entries), entries
    return sum(float(e["duration_s"]) for e in entries), total


def _slurm_cluster(root: Path):
    """``(cluster to stop or None, reason the slurm row is left out or None)``."""
    if shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return None, None  # a cluster of the caller's
    from tests.harness.slurm import SlurmCluster, why_no_slurm

    reason = why_no_slurm()
    if reason:
        return None, reason
    cluster = SlurmCluster(root / "slurm-cluster", cpus=4).start()
    os.environ["SLURM_CONF"] = str(cluster.conf)
    return cluster, None


def run_bench(nproc: int = 2, work: float = 2.0, repeats: int = 3,
              only: list[str] | None = None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-executors-"))
    cluster = None
    try:
        (root / "worker.py").write_text(WORKER)
        command = f"{sys.executable} worker.py {work}"
        (root / "remoteops.toml").write_text(
            "[pipeline]\nheartbeat_seconds = 1.0\npoll_seconds = 0.3\n\n"
            f'[stages.tr]\ncommand = "{command}"\nexecutor = "torchrun"\n'
            f"nproc_per_node = {nproc}\n\n"
            f'[stages.pr]\ncommand = "{command}"\n\n'
            f'[stages.sl]\ncommand = "{command}"\nexecutor = "slurm"\n\n'
            + "".join(f'[stages.c{i}]\ncommand = "{command}"\nexecutor = "slurm"\n\n'
                      for i in (1, 2, 3))
            + "".join(f'[stages.s{i}]\ncommand = "{command}"\nexecutor = "slurm"\n'
                      f'[stages.s{i}.slurm]\nchain = "stage"\n\n' for i in (1, 2, 3)) +
            "[slurm]\npoll_seconds = 0.5\n")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes",
                    "1", "--nproc_per_node", str(nproc), "worker.py", str(work)]
        ways = {"torchrun": (torchrun, "tr"),
                "process": ([sys.executable, "worker.py", str(work)], "pr")}
        out: dict = {"nproc_per_node": nproc, "work_s": work, "repeats": repeats}
        cluster, reason = _slurm_cluster(root)
        if reason:
            out["slurm_left_out"] = reason
        else:
            ways["slurm"] = (["sbatch", "--wait", "--quiet", "-o", "/dev/null", "--wrap",
                              command], "sl")
            ways["slurm chain"] = (command, "c1,c2,c3")
            ways["slurm 3 stages"] = (command, "s1,s2,s3")
        for name, (argv, stage) in ways.items():
            if only and name not in only:
                continue
            bare, stage_s, total = [], [], []
            for _ in range(repeats):  # interleaved: the machine's load hits all three alike
                bare.append(_bare_chain(root, argv) if isinstance(argv, str) else
                            _bare(root, argv))
                s, t = _staged(root, stage)
                stage_s.append(s)
                total.append(t)
            b, s, t = (statistics.median(x) for x in (bare, stage_s, total))
            out[name] = {"bare_s": round(b, 2), "stage_s": round(s, 2),
                         **({"stages": 3, "bare_per_stage_s": round(b / 3, 2),
                             "end_to_end_per_stage_s": round(t / 3, 2)}
                            if "," in stage else {}),
                         "end_to_end_s": round(t, 2), "stage_over_bare": round(s / b, 3),
                         "end_to_end_over_bare": round(t / b, 3)}
        return out
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--work", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="rows to run, comma-separated (e.g. "
                        "'slurm,slurm chain,slurm 3 stages'); default: all")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    result = run_bench(args.nproc, args.work, args.repeats, only)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.nproc} ranks (torchrun; process and slurm: 1), {args.work:g} s of work, "
          f"median of {args.repeats}")
    print(f"{'executor':14} {'bare':>7} {'stage':>7} {'ratio':>6} {'end to end':>11} {'ratio':>6}")
    if "slurm_left_out" in result:
        print(f"slurm: left out ({result['slurm_left_out']})")
    for name in [n for n in ("torchrun", "process", "slurm", "slurm chain", "slurm 3 stages")
                 if n in result]:
        r = result[name]
        print(f"{name:14} {r['bare_s']:6.2f}s {r['stage_s']:6.2f}s {r['stage_over_bare']:6.3f} "
              f"{r['end_to_end_s']:10.2f}s {r['end_to_end_over_bare']:6.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
