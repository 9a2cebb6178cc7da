"""bench-sync: sync-data against a plain scp loop over a real local sshd.

- throughput: N small samples (a folder of two small files each) already on disk, sent by one
  ``sync-data`` run, against ``scp -r`` of each folder in turn (the scp loop runs on the first
  ``--scp-samples`` only and is scaled, since each scp is a whole SSH connection);
- latency: samples completed (renamed into place) every 0.2 to 0.5 s while ``sync-data --watch``
  runs, from completion to the sample's line in the server's manifest; against an scp loop
  that sends each sample the moment it is complete (no stability check, no verification).

Both sides use one sshd whose login shell is quiet (a banner breaks scp itself; sync-data is
immune, see tests/sync/). Run: python -m tests.bench.bench_sync [--samples 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _sample(folder: Path, i: int, rng: random.Random) -> None:
    tmp = folder / f"sample_{i:05d}.tmp"
    tmp.mkdir()
    (tmp / "prompt.json").write_text(json.dumps({"instruction": f"q{i}",
                                                 "output": "a" * rng.randint(200, 800)}))
    (tmp / "meta.json").write_text('{"source": "api"}\n')
    os.rename(tmp, folder / f"sample_{i:05d}")


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class Box:
    """One sshd, a laptop HOME with an alias ``box``, a project syncing to the server root."""

    def __init__(self, work: Path):
        from tests.harness.sshd import start_sshd

        quiet = work / "server-home"
        quiet.mkdir()
        quiet.chmod(0o755)
        self.server = start_sshd(work / "sshd", extra_config=f"SetEnv HOME={quiet}\n")
        self.home = work / "home"
        (self.home / ".ssh").mkdir(parents=True)
        (self.home / ".ssh" / "config").write_text(
            f"Host box\n  HostName {self.server.host}\n  Port {self.server.port}\n  User root\n"
            f"  IdentityFile {self.server.client_key}\n")
        self.known = work / "known_hosts"
        self.known.write_text(self.server.known_hosts_line)
        self.root = work / "server" / "proj"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("REMOTEOPS_", "TRAIN_SYNC_"))}
        self.env.update(HOME=str(self.home), REMOTEOPS_REMOTE_PYTHON=sys.executable,
                        TRAIN_SYNC_PROJECT_ROOT=str(self.root))

    def project(self, work: Path, name: str, poll: float, settle: float) -> Path:
        proj = work / name
        (proj / ".remoteops").mkdir(parents=True)
        (proj / ".remoteops" / "known_hosts").write_text(self.server.known_hosts_line)
        (proj / "samples").mkdir()
        (proj / "remoteops.toml").write_text(
            f'[sync]\nsource = "samples"\ndest = "data/{name}"\npoll_seconds = {poll}\n'
            f'settle_seconds = {settle}\n')
        return proj

    def scp(self, src: Path, dest: str) -> None:
        subprocess.run(["scp", "-q", "-r", "-F", "/dev/null", "-i", str(self.server.client_key),
                        "-o", f"UserKnownHostsFile={self.known}", "-o", "BatchMode=yes",
                        "-P", str(self.server.port), str(src), f"root@{self.server.host}:{dest}"],
                       check=True, env=self.env)

    def sync(self, proj: Path, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "remoteops", "sync-data", "--host", "box",
                               *args], cwd=proj, env=self.env, capture_output=True, text=True,
                              check=True, **kw)


def throughput(box: Box, work: Path, n: int, scp_n: int) -> dict:
    rng = random.Random(1)
    proj = box.project(work, "bulk", poll=2.0, settle=0.0)
    for i in range(n):
        _sample(proj / "samples", i, rng)
    started = time.monotonic()
    box.sync(proj)
    ours = time.monotonic() - started
    assert len((box.root / "data" / "bulk" / ".manifest.jsonl").read_text().splitlines()) == n
    dest = box.root / "data" / "scp-bulk"
    dest.mkdir(parents=True)
    started = time.monotonic()
    for i in range(scp_n):
        box.scp(proj / "samples" / f"sample_{i:05d}", str(dest) + "/")
    per_scp = (time.monotonic() - started) / scp_n
    return {"samples": n, "sync_data_s": round(ours, 2),
            "sync_data_samples_per_s": round(n / ours, 1),
            "scp_loop_samples_measured": scp_n, "scp_loop_s_scaled": round(per_scp * n, 2),
            "scp_samples_per_s": round(1 / per_scp, 1),
            "speedup_vs_scp": round(per_scp * n / ours, 1)}


def _arrivals(manifest: Path, seen: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            for line in manifest.read_text().splitlines():
                seen.setdefault(json.loads(line)["id"], time.time())
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)


def latency(box: Box, work: Path, n: int, poll: float, settle: float) -> dict:
    rng = random.Random(2)
    name = f"live-{str(poll).replace('.', '_')}"
    proj = box.project(work, name, poll=poll, settle=settle)
    manifest = box.root / "data" / name / ".manifest.jsonl"
    done: dict[str, float] = {}
    seen: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_arrivals, args=(manifest, seen, stop), daemon=True)
    watcher.start()
    proc = subprocess.Popen([sys.executable, "-m", "remoteops", "sync-data", "--host", "box",
                             "--watch"], cwd=proj, env=box.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(2.0)  # started and connected
    for i in range(n):
        _sample(proj / "samples", i, rng)
        done[f"sample_{i:05d}"] = time.time()
        time.sleep(rng.uniform(0.2, 0.5))
    deadline = time.monotonic() + 60
    while len(seen) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(2)
    proc.wait(30)
    stop.set()
    ours = [seen[k] - done[k] for k in done]
    # the scp loop: each sample sent the moment it is complete
    dest = box.root / "data" / "scp-live"
    dest.mkdir(parents=True, exist_ok=True)
    scp_lat = []
    for i in range(n):
        _sample(proj / "samples", n + i, rng)
        t0 = time.time()
        box.scp(proj / "samples" / f"sample_{n + i:05d}", str(dest) + "/")
        scp_lat.append(time.time() - t0)
        time.sleep(rng.uniform(0.2, 0.5))
    return {"samples": n, "poll_seconds": poll, "settle_seconds": settle,
            "sync_median_s": round(statistics.median(ours), 2), "sync_p95_s": round(_p(ours, .95), 2),
            "scp_median_s": round(statistics.median(scp_lat), 2),
            "scp_p95_s": round(_p(scp_lat, .95), 2),
            "median_ratio_vs_scp": round(statistics.median(ours) / statistics.median(scp_lat), 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--scp-samples", type=int, default=100)
    parser.add_argument("--live-samples", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    work = Path(tempfile.mkdtemp(prefix="remoteops-bench-sync-"))
    work.chmod(0o755)
    box = Box(work)
    try:
        out = {"throughput": throughput(box, work, args.samples, args.scp_samples),
               "latency_default": latency(box, work, args.live_samples, 2.0, 1.0),
               "latency_fast": latency(box, work, args.live_samples, 0.5, 0.3)}
    finally:
        box.server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
