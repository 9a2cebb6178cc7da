"""The issue's end-to-end test: a generator writes samples locally (some in two chunks with
a pause), `sync-data --watch` pushes them over a real sshd whose login shell prints a banner,
through a proxy that cuts the connection mid-upload, and is kill -9ed once and restarted;
the pipeline's trainer (tiny demo model, CPU) waits for min_samples (`status` shows it),
grows, and trains on exactly the generated set: no duplicates, none missing, none partial."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.harness.ctrl_c import remoteops_argv
from tests.harness.proxy import CutProxy, host_through
from tests.harness.waits import wait_for
from tests.live.conftest import REPO, chat_line, consumed

TOTAL = 24
MIN = 8


def _generate(folder: Path, made: dict, stop: threading.Event) -> None:
    """A sample folder every 0.2 to 0.5 s; every third written in two chunks with a pause."""
    rng = random.Random(12)
    for i in range(TOTAL):
        if stop.is_set():
            return
        line, note = chat_line(i), f"generated {i}\n".encode()
        target = folder / f"sample_{i:04d}"
        target.mkdir()
        (target / "note.txt").write_bytes(note)
        if i % 3 == 0:
            with open(target / "sample.jsonl", "wb") as fh:
                fh.write(line[:len(line) // 2])
                fh.flush()
                time.sleep(0.3)  # half a JSON line on disk: must never be trained on
                fh.write(line[len(line) // 2:])
        else:
            (target / "sample.jsonl").write_bytes(line)
        text = "".join(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n"
                       for rel, data in sorted({"note.txt": note, "sample.jsonl": line}.items()))
        made[target.name] = hashlib.sha256(text.encode()).hexdigest()
        time.sleep(rng.uniform(0.2, 0.5))



def _manifest(dest: Path) -> list[dict]:
    path = dest / ".manifest.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def test_generate_sync_and_train_on_exactly_the_generated_set(
        project, synced, noisy_sshd, demo_model, tmp_path):
    root, env = synced
    root.mkdir(parents=True)
    (root / "outputs").mkdir()
    (root / "outputs" / "demo-model").symlink_to(demo_model, target_is_directory=True)
    (root / "remoteops.toml").write_text(
        '[train]\nbase_model = "outputs/demo-model"\nlr = 2e-3\n'
        f'[stages.live]\ndataset_live = "data/live"\nmin_samples = {MIN}\npoll_seconds = 0.2\n'
        '[stages.live.train]\nepochs = 1\nbatch_size = 2\ngrad_accum = 2\nmax_seq_len = 96\n'
        'lora_r = 4\nlora_targets = ["q_proj", "v_proj"]\n')
    proxy = CutProxy((noisy_sshd.host, noisy_sshd.port))
    (project / "remoteops.toml").write_text(
        '[sync]\nsource = "samples"\nformat = "dirs"\npoll_seconds = 0.3\n'
        'settle_seconds = 0.4\nbatch_max = 6\n'
        + host_through(project, noisy_sshd, proxy))
    env = {**os.environ, **env, "REMOTEOPS_SSH__RETRY_BACKOFF": "0.2", "PYTHONPATH": str(REPO)}
    agent_env = {**env, "REMOTEOPS_USER_CONFIG": str(root / "none.toml")}
    started = subprocess.run([sys.executable, "-m", "remoteops.agent", "pipeline-start",
                              "--root", str(root), "--stages", "live", "--json"], env=agent_env,
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stdout + started.stderr
    run = next((root / "outputs" / "training_sync").glob("run_*"))

    def status() -> str:
        res = subprocess.run([sys.executable, "-m", "remoteops", "status", "--host", "box"],
                             cwd=project, env=env, capture_output=True, text=True, timeout=60)
        return res.stdout + res.stderr

    wait_for(lambda: (run / "live_live.json").exists(), 60, "the stage to start waiting")
    shown = status()
    assert f"waiting for data 0/{MIN}" in shown, shown

    samples, dest = project / "samples", root / "data" / "live"
    samples.mkdir()
    made: dict[str, str] = {}
    stop = threading.Event()
    writer = threading.Thread(target=_generate, args=(samples, made, stop), daemon=True)
    writer.start()

    def sync(log: Path, *extra: str, wait: bool = False):
        cmd = remoteops_argv("sync-data", "--host", "viaproxy", *extra)  # Ctrl-C reaches it
        if wait:
            return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True,
                                  timeout=60)
        return subprocess.Popen(cmd, cwd=project, env=env, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT)

    proc = None
    try:
        wait_for(lambda: len(made) >= 3, 30, "the first samples")
        proxy.arm(30_000)  # the first connection dies inside the first upload
        proc = sync(tmp_path / "sync1.log", "--watch")
        wait_for(lambda: proxy.cuts == 1, 30, "the cut")
        wait_for(lambda: len(_manifest(dest)) >= MIN + 2, 60, "more than min_samples")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc = sync(tmp_path / "sync2.log", "--watch")
        writer.join(60)
        wait_for(lambda: len(_manifest(dest)) >= TOTAL, 60, "every sample on the server")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        done = sync(tmp_path / "done.log", "--done", wait=True)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: json.loads((run / "state.json").read_text())["status"] != "running"
                  and (run / "state.json").read_text().count('"exited"'), 120, "the run")
    finally:
        stop.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
        proxy.close()
    state = json.loads((run / "state.json").read_text())
    log = (run / "logs" / "live.log").read_text()
    assert state["status"] == "done", log[-3000:]
    assert "Traceback" not in log and "skipped" not in log
    assert f"waiting for data 0/{MIN}" in log
    sizes = [int(l.split(",")[-2]) for l in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert sizes[0] >= MIN and sizes == sorted(sizes) and sizes[-1] == TOTAL

    trained = consumed(run)
    ids = [c["id"] for c in trained]
    assert len(ids) == len(set(ids)) == TOTAL, "a sample was trained twice or missed"
    assert set(ids) == set(made)
    listed = {e["id"]: e["sha256"] for e in _manifest(dest)}
    assert all(listed[i] == made[i] for i in ids), "a sample differs from what was generated"
    entry = json.loads((run / "summary.json").read_text())["stages"]["live"]["live"]
    assert entry["bad_lines"] == 0 and entry["records_trained"] == TOTAL and entry["complete"]
    assert entry["growth"], "the set never grew while training"
    first_step = min(c["step"] for c in trained)
    assert sum(1 for c in trained if c["step"] == first_step) == 4
    report = (run / "TRAINING_SUMMARY.md").read_text()
    assert "## Live data" in report and f"to {TOTAL} samples" in report
    assert (run / "loss_live.png").is_file()
    assert "Welcome" not in (tmp_path / "sync1.log").read_text()
