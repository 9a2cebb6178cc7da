"""bench-pipeline: what the pipeline adds per stage, and what `invoke status` costs, over a real
sshd as a user whose ~/.bashrc sleeps 0.5 s (like a conda init).

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


def _user_venv(work: Path, user: str) -> Path:
    """A venv the throwaway user can run (root's Python lives under a private /root), with
    this toolkit installed from its own wheel, as deploy-bundle would do."""
    from remoteops.laptop.wheel import build_toolkit_wheel

    venv = work / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    wheel = build_toolkit_wheel(work / "wheel")
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    str(wheel)], check=True)
    subprocess.run(["chown", "-R", f"{user}:{user}", str(work / "server")], check=True)
    return venv / "bin" / "python"


def run_bench(status_repeats: int = 5) -> dict:
    sys.path.insert(0, str(REPO))
    from tests.harness.sshd import make_user, remove_user, start_sshd

    work = Path(tempfile.mkdtemp(prefix="remoteops-bench-pipeline-"))
    work.chmod(0o755)
    server = start_sshd(work / "sshd")
    user = make_user("sleep 0.5  # like a conda init\n")
    try:
        home = work / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "config").write_text(
            f"Host box\n  HostName {server.host}\n  Port {server.port}\n  User {user}\n"
            f"  IdentityFile {server.client_key}\n")
        (work / "server").mkdir()
        python = _user_venv(work, user)
        project = work / "proj"
        project.mkdir()
        (project / "remoteops.toml").write_text(
            'gpu_gate = "off"\n[precheck]\nrequired_packages = ["click"]\n'
            + "".join(f'[stages.{n}]\ncommand = "sleep {SLEEP}"\n' for n in "abc"))
        (project / ".remoteops").mkdir()
        (project / ".remoteops" / "known_hosts").write_text(server.known_hosts_line)
        env = {**os.environ, "HOME": str(home), "REMOTEOPS_REMOTE_PYTHON": str(python),
               "TRAIN_SYNC_PROJECT_ROOT": str(work / "server" / "proj"), "COLUMNS": "120"}
        env.pop("SSH_AUTH_SOCK", None)
        wall, res = _cli(project, env, "remote-train", "--host", "box", "--yes", "--stages",
                         "a,b,c")
        if res.returncode != 0:
            raise SystemExit(f"remote-train failed:\n{res.stdout}\n{res.stderr}")
        run = sorted((work / "server" / "proj" / "outputs" / "training_sync").glob("run_*"))[-1]
        stages = {s["name"]: s for s in json.loads((run / "state.json").read_text())["stages"]}
        overhead = [stages[n]["duration_s"] - SLEEP for n in "abc"]
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
            "command_stage_overhead_s": [round(x, 2) for x in overhead],
            "command_stage_overhead_median_s": round(statistics.median(overhead), 2),
            "status_s": [round(t, 2) for t in status_times],
            "status_median_s": round(statistics.median(status_times), 2),
            "status_ssh_commands": 1,
            "plain_ssh_true_median_s": round(statistics.median(login), 2),
            "remote_train_wall_s": round(wall, 1),
            "targets": {"overhead_per_stage_s": 2.0, "status_s": 1.5},
        }
    finally:
        server.stop()
        remove_user(user)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from tests.harness.install import ensure_tools

    ensure_tools("sshd", "ssh", "ssh-keygen")  # or stop with one line
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
    print(f"  invoke status: {result['status_s']} s, median {result['status_median_s']} s, "
          f"1 SSH command [{ok(result['status_median_s'], 1.5)}: < 1.5 s]; a bare "
          f"'ssh box true' takes {result['plain_ssh_true_median_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
