"""Redeploys through the kept connection (laptop/keeper, server/resident) against a real sshd.

The sshd logs every login ("Accepted publickey"), so a test can tell a deploy that logged
in from one that went through the kept connection. Faults are real: the keeper killed
with SIGKILL, the connection cut by a proxy in the middle of an upload, a changed host
key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ssh_alias, sshd_folder, trust
from tests.harness.proxy import CutProxy
from tests.harness.sshd import start_sshd
from tests.harness.waits import wait_for
from tests.test_deploy import as_json, expected_tree, make_project, tree

LOGIN = "Accepted publickey"
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


@pytest.fixture(scope="module")
def own_sshd():
    folder = sshd_folder()
    server = start_sshd(folder)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def keepers(folder: Path) -> dict[str, int]:
    """Each keeper's key and pid (from its lock file), alive or not."""
    out = {}
    for lock in (folder / "remoteops").glob("*.lock"):
        text = lock.read_text().strip()
        if text:
            out[lock.stem] = int(text)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(") ")[-1][0] != "Z"


@pytest.fixture
def runtime():
    """A private runtime folder for the keepers of one test; they are stopped afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="ro-kept-"))
    folder.chmod(0o700)
    yield folder
    for pid in keepers(folder).values():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def box(cli, home, project, own_sshd, tmp_path, runtime):
    """``deploy(*args)``: deploy-bundle to alias ``box`` with kept connections on."""
    make_project(project)
    ssh_alias(home, "box", own_sshd)
    trust(project, own_sshd)
    root = tmp_path / "server"

    def deploy(*args: str, expect: int | None = 0, host: str = "box", env: dict | None = None):
        mark = len(own_sshd.log())
        res = cli("deploy-bundle", "--host", host, "--project-root", str(root), "--yes", *args,
                  env={"REMOTEOPS_REMOTE_PYTHON": sys.executable, "XDG_RUNTIME_DIR": str(runtime),
                       "REMOTEOPS_SSH__PERSIST": "120", **(env or {})}, timeout=300)
        assert (res.returncode != 0 if expect is None else res.returncode == expect), \
            res.stdout + res.stderr[-3000:]
        res.logins = own_sshd.log()[mark:].count(LOGIN)
        return res

    deploy.root = root
    return deploy


def listening(runtime: Path) -> list[int]:
    """The pids of the keepers whose socket is up (their info file names them)."""
    out = []
    for info in runtime.glob("remoteops/*.json"):
        try:
            pid = json.loads(info.read_text())["pid"]
        except (OSError, ValueError):
            continue
        if info.with_suffix(".sock").exists() and alive(pid):
            out.append(pid)
    return out


def keeper_logs(runtime: Path) -> str:
    """Every keeper's log in ``runtime``: what a failed request's message needs (why the
    frames ended: the connection, or something that was not a frame)."""
    return "".join(f"\n--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                   for log in sorted((runtime / "remoteops").glob("*.log")))


def kept_up(runtime: Path, besides: tuple = ()) -> int:
    """Wait for a keeper (not one of ``besides``) to listen; its pid."""
    wait_for(lambda: [p for p in listening(runtime) if p not in besides], 60,
             "a kept connection")
    return next(p for p in listening(runtime) if p not in besides)


def test_redeploys_go_through_the_kept_connection_without_logging_in(box, project, runtime,
                                                                      cli, own_sshd):
    assert box().logins == 1  # the deploy logs in; the keeper it leaves behind, after it
    pid = kept_up(runtime)
    (project / "code" / "train.py").write_text("print('v2')\n")
    out = box("--json")
    assert out.logins == 0
    assert as_json(out)["plan"]["changed"] == ["code/train.py"]
    assert tree(box.root) == expected_tree(project)
    noop = box("--json")
    assert noop.logins == 0 and as_json(noop)["noop"]
    # the agent's commands that only read answer through it as well (each in a forked child)
    env = {"REMOTEOPS_REMOTE_PYTHON": sys.executable, "XDG_RUNTIME_DIR": str(runtime),
           "REMOTEOPS_SSH__PERSIST": "120"}
    mark = len(own_sshd.log())
    rows = as_json(cli("backups", "--host", "box", "--project-root", str(box.root), "--json",
                       env=env))
    assert [r["current"] for r in rows] == [False, True] and rows[-1]["version"] == 2
    missing = cli("status", "--host", "box", "--project-root", str(box.root), env=env)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no pipeline runs under")
    assert own_sshd.log()[mark:].count(LOGIN) == 0
    listed = cli("connections", "--json", env={"XDG_RUNTIME_DIR": str(runtime)})
    rows = json.loads(listed.stdout)["connections"]
    # the keeper logs in once, so it takes the ssh binary (2 more round trips, once)
    assert [(r["target"], r["pid"], r["via"]) for r in rows] == [("box", pid, "ssh")]
    # from another project's folder: not listed, not closed, unless --all
    elsewhere = project.parent / "other"
    elsewhere.mkdir()
    other = cli("connections", "--close", cwd=elsewhere, env={"XDG_RUNTIME_DIR": str(runtime)})
    assert "no kept connections for this project" in other.stdout and alive(pid)
    every = cli("connections", "--all", "--json", cwd=elsewhere,
                env={"XDG_RUNTIME_DIR": str(runtime)})
    assert [r["pid"] for r in json.loads(every.stdout)["connections"]] == [pid]
    closed = cli("connections", "--close", env={"XDG_RUNTIME_DIR": str(runtime)})
    assert closed.returncode == 0 and "closed" in closed.stdout
    wait_for(lambda: not alive(pid), 10, "the keeper to exit")
    assert not list((runtime / "remoteops").glob("*.sock"))
    (project / "code" / "train.py").write_text("print('v3')\n")
    assert box().logins == 1  # logged in again (and left a new keeper)
    assert tree(box.root) == expected_tree(project)


def test_a_killed_keeper_is_replaced_and_nothing_is_lost(box, project, runtime):
    box()
    pid = kept_up(runtime)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), 10, "the keeper to die")
    (project / "code" / "train.py").write_text("print('after the kill')\n")
    res = box()  # its socket is still there: refused, so the deploy logs in as always
    assert res.logins >= 1
    assert tree(box.root) == expected_tree(project)
    new = kept_up(runtime, besides=(pid,))
    assert new != pid
    (project / "code" / "util.py").write_text("U = 2\n")
    assert box().logins == 0
    assert tree(box.root) == expected_tree(project)


def test_a_cut_mid_upload_changes_nothing_and_the_next_deploy_recovers(box, project, home,
                                                                        own_sshd, runtime):
    proxy = CutProxy((own_sshd.host, own_sshd.port))
    try:
        via = dataclasses.replace(own_sshd, port=proxy.port)
        ssh_alias(home, "cut", via)
        trust(project, via)
        box(host="cut")
        before = tree(box.root)
        kept_up(runtime)
        (project / "data" / "big.bin").write_bytes(os.urandom(6_000_000))
        assert proxy.arm_open(2_000_000) == 1  # the keeper's, in the middle of the 6 MB
        res = box(host="cut", expect=None)
        assert proxy.cuts == 1
        said = res.stdout + res.stderr
        assert "connection lost to cut (" in said and "Traceback" not in said
        assert len([l for l in res.stderr.splitlines() if l.strip()]) == 1, res.stderr
        assert tree(box.root) == before  # nothing applied: the go-ahead never came
        out = box("--json", host="cut")
        assert as_json(out)["plan"]["added"] == ["data/big.bin"]
        assert tree(box.root) == expected_tree(project)
    finally:
        proxy.close()


def test_a_changed_host_key_never_reuses_the_kept_connection(box, project, runtime):
    box()
    kept_up(runtime)
    known = project / ".remoteops" / "known_hosts"
    host = known.read_text().split()[0]
    known.write_text(f"{host} {OTHER_KEY}\n")
    (project / "code" / "train.py").write_text("print('must not arrive')\n")
    res = box(expect=None)
    said = res.stdout + res.stderr
    assert "host key" in said and "Traceback" not in said
    assert res.logins == 0
    assert "must not arrive" not in (box.root / "code" / "train.py").read_text()


def test_an_idle_kept_connection_closes_itself(box, runtime, own_sshd):
    box(env={"REMOTEOPS_SSH__PERSIST": "2"})
    pid = kept_up(runtime)
    log = next((runtime / "remoteops").glob("*.log"))
    resident = int(json.loads(log.read_text().split("resident agent ready: ")[1]
                              .splitlines()[0])["pid"])
    assert alive(resident)
    wait_for(lambda: not alive(pid), 20, "the idle keeper to exit")
    assert "no request for 2s: closing" in log.read_text()
    assert not list((runtime / "remoteops").glob("*.sock"))
    wait_for(lambda: not alive(resident), 10, "the resident agent to exit with its session")


def test_persist_zero_keeps_nothing(box, runtime):
    box(env={"REMOTEOPS_SSH__PERSIST": "0"})
    time.sleep(1.0)
    assert keepers(runtime) == {}
    assert not list(runtime.glob("remoteops/*.sock"))
    assert box(env={"REMOTEOPS_SSH__PERSIST": "0"}).logins == 1


def test_a_banner_before_the_resident_changes_nothing(box, project, runtime, tmp_path):
    """What a login shell prints on stdout comes before the resident's frames."""
    wrapper = tmp_path / "python.sh"
    wrapper.write_text('#!/bin/bash\necho "Welcome to the GPU box: banner on stdout"\n'
                       'echo "motd" >&2\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    env = {"REMOTEOPS_REMOTE_PYTHON": str(wrapper)}
    box(env=env)
    kept_up(runtime)
    (project / "code" / "train.py").write_text("print('through the banner')\n")
    res = box("--json", env=env)
    assert res.logins == 0 and as_json(res)["plan"]["changed"] == ["code/train.py"]
    assert tree(box.root) == expected_tree(project)


def test_a_keeper_that_cannot_start_its_agent_is_not_retried_at_once(box, project, runtime,
                                                                     tmp_path):
    """A server whose Python runs the deploy but not the resident agent (here a wrapper
    that refuses it): the keeper says why in its log, and the next commands log in as
    always without starting another one for a while."""
    wrapper = tmp_path / "python.sh"
    wrapper.write_text('#!/bin/bash\ncase "$*" in *resident*) echo "resident refused" >&2; '
                       f'exit 3;; esac\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    env = {"REMOTEOPS_REMOTE_PYTHON": str(wrapper)}
    box(env=env)
    folder = runtime / "remoteops"
    wait_for(lambda: list(folder.glob("*.failed")), 60, "the keeper to give up")
    log = next(folder.glob("*.log")).read_text()
    assert "the resident agent did not start on box: resident refused" in log
    pid = next(iter(keepers(runtime).values()))
    wait_for(lambda: not alive(pid), 10, "the failed keeper to exit")
    (project / "code" / "train.py").write_text("print('still deployed')\n")
    assert box(env=env).logins == 1
    time.sleep(1.0)
    assert list(keepers(runtime).values()) == [pid]  # none started again
    assert tree(box.root) == expected_tree(project)


def test_a_link_that_died_unnoticed_costs_one_timeout(box, project, home, own_sshd, runtime):
    """A laptop that slept: the kept connection's TCP flow is gone without a reset (the
    proxy drops its bytes, as a NAT that forgot it). The deploy waits at most the connect
    timeout for the keeper, then logs in as always; the keeper gives up and exits."""
    proxy = CutProxy((own_sshd.host, own_sshd.port))
    try:
        via = dataclasses.replace(own_sshd, port=proxy.port)
        ssh_alias(home, "cut", via)
        trust(project, via)
        env = {"REMOTEOPS_SSH__CONNECT_TIMEOUT": "2"}
        box(host="cut", env=env)
        pid = kept_up(runtime)
        assert proxy.blackhole() == 1
        (project / "code" / "train.py").write_text("print('after the sleep')\n")
        started = time.monotonic()
        res = box(host="cut", env=env)
        assert res.logins == 1 and time.monotonic() - started < 30
        assert tree(box.root) == expected_tree(project)
        wait_for(lambda: not alive(pid), 30, "the stuck keeper to give up")
        log = next((runtime / "remoteops").glob("*.log")).read_text()
        assert "the resident agent did not answer: closing" in log
    finally:
        proxy.close()


def test_a_command_while_the_keeper_is_busy_logs_in_as_always(box, project, runtime, cli,
                                                               own_sshd, monkeypatch):
    """One request at a time: a command that comes while another holds the kept connection
    waits a moment, then logs in as always; the held request, given no input, changes
    nothing."""
    from remoteops.common.config import load_settings
    from remoteops.laptop.targets import open_target

    box()
    kept_up(runtime)
    env = {"REMOTEOPS_REMOTE_PYTHON": sys.executable, "XDG_RUNTIME_DIR": str(runtime),
           "REMOTEOPS_SSH__PERSIST": "120"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    target = open_target(load_settings(project), "box")
    held = target.kept.request(["deploy-stream", "--root", str(box.root), "--json"])
    assert held is not None  # the same key as the keeper's: it started on the server
    try:
        mark = len(own_sshd.log())
        listed = cli("backups", "--host", "box", "--project-root", str(box.root), "--json",
                     env=env)
        assert listed.returncode == 0, listed.stderr
        assert [r["version"] for r in as_json(listed)] == [1]
        assert own_sshd.log()[mark:].count(LOGIN) == 1  # it could not use the busy keeper
    finally:
        held.close()  # the held deploy request reads the end of its input
    wait_for(lambda: target.kept.run(["version", "--json"], 10, "box") is not None, 10,
             "the keeper to take requests again")
    assert tree(box.root) == expected_tree(project)  # as deployed: nothing changed


def test_a_chosen_client_is_the_keepers_too(box, project, runtime, cli):
    env = {"REMOTEOPS_SSH__CLIENT": "paramiko"}
    box(env=env)
    pid = kept_up(runtime)
    rows = json.loads(cli("connections", "--json", env={"XDG_RUNTIME_DIR": str(runtime)})
                      .stdout)["connections"]
    assert [(r["pid"], r["via"]) for r in rows] == [(pid, "paramiko")]
    (project / "code" / "train.py").write_text("print('over paramiko')\n")
    assert box(env=env).logins == 0
    assert tree(box.root) == expected_tree(project)


def test_a_command_gone_in_the_middle_of_an_input_frame_changes_nothing(box, project, runtime,
                                                                        monkeypatch):
    """The keeper moves a frame's payload to the server as it comes (splice): a command that
    goes away half-way through one leaves that frame incomplete there, so the keeper closes
    the connection; the request ends without its go-ahead, and the next deploy logs in."""
    from remoteops.common.config import load_settings
    from remoteops.common.kept_wire import HEAD, INPUT
    from remoteops.laptop.targets import open_target

    box()
    before = tree(box.root)
    pid = kept_up(runtime)
    for name, value in {"REMOTEOPS_REMOTE_PYTHON": sys.executable,
                        "XDG_RUNTIME_DIR": str(runtime), "REMOTEOPS_SSH__PERSIST": "120"}.items():
        monkeypatch.setenv(name, value)
    target = open_target(load_settings(project), "box")
    held = target.kept.request(["deploy-stream", "--root", str(box.root), "--json"])
    assert held is not None  # it started on the server through this keeper
    held.sock.sendall(HEAD.pack(INPUT, 1 << 20) + b"@" * 70_000)  # 70 KB of a 1 MiB frame
    held.close()
    wait_for(lambda: not alive(pid), 30, "the keeper to close its connection")
    assert "broke off mid-frame" in next(runtime.glob("remoteops/*.log")).read_text()
    assert tree(box.root) == before
    (project / "code" / "train.py").write_text("print('after the broken frame')\n")
    res = box()
    assert res.logins >= 1  # its connection was closed: this deploy logged in
    assert tree(box.root) == expected_tree(project)


def test_a_wiped_server_gets_the_whole_bundle_through_the_kept_connection(box, project,
                                                                          runtime):
    """The refused redeploy and the planned one that follows both go through the keeper:
    the bundle's bytes reach the server by sendfile and splice, and nobody logs in."""
    box()
    kept_up(runtime)
    (project / "data" / "big.bin").write_bytes(os.urandom(3_000_000))  # several frames
    assert box().logins == 0
    shutil.rmtree(box.root)
    res = box("--json")
    assert res.logins == 0
    out = as_json(res)
    assert "the server is not as last deployed from here" in " ".join(out["events"])
    assert out["applied"]["created"] == len(expected_tree(project))
    assert tree(box.root) == expected_tree(project)


def test_a_rollback_goes_through_the_kept_connection(box, project, runtime, cli, own_sshd):
    """Its plan and the journaled rollback itself: no login, the tree as the backup had it."""
    box()
    kept_up(runtime)
    v1 = expected_tree(project)
    (project / "code" / "train.py").write_text("print('v2')\n")
    deployed = box("--json")
    assert deployed.logins == 0
    out = as_json(deployed)
    env = {"REMOTEOPS_REMOTE_PYTHON": sys.executable, "XDG_RUNTIME_DIR": str(runtime),
           "REMOTEOPS_SSH__PERSIST": "120"}
    mark = len(own_sshd.log())
    res = cli("rollback", "--host", "box", "--project-root", str(box.root), "--backup",
              out["applied"]["backup_name"], "--yes", env=env)
    assert res.returncode == 0, res.stdout + res.stderr + keeper_logs(runtime)
    assert own_sshd.log()[mark:].count(LOGIN) == 0
    assert tree(box.root) == v1
