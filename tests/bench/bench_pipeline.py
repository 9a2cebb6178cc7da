"""bench-pipeline: what the pipeline adds per stage, and what `invoke status` costs, over a real
sshd whose login shell sleeps 0.5 s (like a conda init).

Run: python -m tests.bench.bench_pipeline [--json]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLEEP = 2.0


def _cli(project: Path, env: dict, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "remoteops", *args], cwd=project, env=env,
                         capture_output=True, text=True, timeout=1800)
    return time.monotonic() - started, res


def run_bench(status_repeats: int = 5) -> dict:
    sys.path.insert(0, str(REPO))
    from remoteops.trainer.demo_model import DEMO_DIR, build_demo_model
    from tests.harness.sshd import start_sshd

    work = Path(tempfile.mkdtemp(prefix="remoteops-bench-pipeline-"))
    work.chmod(0o755)
    slow = work / "slow_login.sh"
    slow.write_text("unset BASH_ENV; sleep 0.5\n")  # once per login, not per subshell
    server = start_sshd(work / "sshd", extra_config=f"SetEnv BASH_ENV={slow}")
    try:
        home = work / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "config").write_text(
            f"Host box\n  HostName {server.host}\n  Port {server.port}\n  User root\n"
            f"  IdentityFile {server.client_key}\n")
        project = work / "proj"
        (project / "data" / "eval").mkdir(parents=True)
        for name, n in (("style", 8),):
            lines = (DEMO_DIR / "data" / f"{name}.jsonl").read_text().splitlines(True)[:n]
            (project / "data" / f"{name}.jsonl").write_text("".join(lines))
            ev = (DEMO_DIR / "data" / "eval" / f"{name}.jsonl").read_text().splitlines(True)[:2]
            (project / "data" / "eval" / f"{name}.jsonl").write_text("".join(ev))
        model = build_demo_model(work / "model", seed=0)
        (project / "remoteops.toml").write_text(f"""
gpu_gate = "off"
[train]
base_model = "{model}"
epochs = 2
grad_accum = 2
max_seq_len = 96
[eval]
max_new_tokens = 6
[stages.a]
command = "sleep {SLEEP}"
[stages.b]
command = "sleep {SLEEP}"
[stages.c]
command = "sleep {SLEEP}"
[stages.style]
dataset = "data/style.jsonl"
eval_set = "data/eval/style.jsonl"
""")
        (project / ".remoteops").mkdir()
        (project / ".remoteops" / "known_hosts").write_text(server.known_hosts_line)
        env = {**os.environ, "HOME": str(home), "REMOTEOPS_REMOTE_PYTHON": sys.executable,
               "TRAIN_SYNC_PROJECT_ROOT": str(work / "server" / "proj"), "COLUMNS": "120"}
        env.pop("SSH_AUTH_SOCK", None)
        wall, res = _cli(project, env, "remote-train", "--host", "box", "--yes", "--stages",
                         "a,b,c,style")
        if res.returncode != 0:
            raise SystemExit(f"remote-train failed:\n{res.stdout}\n{res.stderr}")
        run = sorted((work / "server" / "proj" / "outputs" / "training_sync").glob("run_*"))[-1]
        state = json.loads((run / "state.json").read_text())
        summary = json.loads((run / "summary.json").read_text())["stages"]
        stages = {s["name"]: s for s in state["stages"]}
        command_overhead = [stages[n]["duration_s"] - SLEEP for n in ("a", "b", "c")]
        trainer_own = summary["style"]["duration_s"]
        style_wall = stages["style"]["duration_s"]
        status_times = []
        for _ in range(status_repeats):
            t, res = _cli(project, env, "status", "--host", "box", "--json")
            assert res.returncode == 0, res.stderr
            status_times.append(t)
        login = []
        for _ in range(3):
            t0 = time.monotonic()
            subprocess.run(["ssh", "-F", str(home / ".ssh" / "config"), "-o",
                            f"UserKnownHostsFile={project / '.remoteops' / 'known_hosts'}",
                            "box", "true"], check=True, capture_output=True)
            login.append(time.monotonic() - t0)
        return {
            "command_stage_overhead_s": [round(x, 2) for x in command_overhead],
            "command_stage_overhead_median_s": round(statistics.median(command_overhead), 2),
            "train_stage_wall_s": style_wall, "trainer_own_s": trainer_own,
            "train_stage_overhead_s": round(style_wall - trainer_own, 2),
            "status_s": [round(t, 2) for t in status_times],
            "status_median_s": round(statistics.median(status_times), 2),
            "status_ssh_commands": 1,
            "plain_ssh_true_median_s": round(statistics.median(login), 2),
            "remote_train_wall_s": round(wall, 1),
            "targets": {"overhead_per_stage_s": 2.0, "status_s": 1.5},
        }
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    result = run_bench()
    if "--json" in argv:
        print(json.dumps(result, indent=2))
        return 0
    ok = lambda v, t: "ok" if v <= t else "MISSED"  # noqa: E731
    print("bench-pipeline (login shell sleeps 0.5 s on every SSH command)")
    print(f"  command stage overhead (wall - {SLEEP:g}s sleep): "
          f"{result['command_stage_overhead_s']} s, median "
          f"{result['command_stage_overhead_median_s']} s "
          f"[{ok(result['command_stage_overhead_median_s'], 2.0)}: <= 2 s]")
    print(f"  train stage: wall {result['train_stage_wall_s']} s, trainer's own "
          f"{result['trainer_own_s']} s, overhead {result['train_stage_overhead_s']} s "
          "(agent start, torch import, eval)")
    print(f"  invoke status: {result['status_s']} s, median {result['status_median_s']} s, "
          f"1 SSH command [{ok(result['status_median_s'], 1.5)}: < 1.5 s]; a bare "
          f"'ssh box true' takes {result['plain_ssh_true_median_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
