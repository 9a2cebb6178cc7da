"""invoke serve / chat against a real sshd: the tiny demo model's adapter and its GGUF q4_k_m
served on the CPU, reached through a port forwarded over the SSH connection; the server binds
127.0.0.1 only; a second serve on the same port is refused; --stop leaves no process."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from remoteops.common.locks import pid_alive
from tests.conftest import sshd_folder, ssh_alias, trust
from tests.harness.ctrl_c import remoteops_argv
from tests.harness.sshd import free_port, start_sshd

RUN = "run_20261126T100000Z"


@pytest.fixture
def laptop(project, home, sshd_server, served_root) -> Path:
    """The laptop's project: the same remoteops.toml, the server as the ssh alias ``box``."""
    (project / "remoteops.toml").write_text((served_root / "remoteops.toml").read_text())
    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)
    return project


def env(served_root: Path) -> dict:
    return {"REMOTEOPS_REMOTE_PYTHON": sys.executable, "TRAIN_SYNC_PROJECT_ROOT": str(served_root)}


def serving_pids(port: int) -> list[int]:
    """Live processes started as ``serve-run ... --port <port>`` (zombies have no cmdline)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve-run" in argv and str(port).encode() in argv:
            found.append(int(name))
    return found


def listening_addresses(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) listening on ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if int(hexport, 16) == port and fields[3] == "0A":
                out.append(addr)
    return out


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _signals(pid: int) -> str:
    """A process's blocked, ignored and caught signal masks (from /proc)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "(gone)"
    return " ".join(l for l in lines if l.startswith(("SigBlk", "SigIgn", "SigCgt")))


class Foreground:
    """``remoteops serve`` running in the foreground, its output read line by line."""

    def __init__(self, args: list[str], cwd: Path, extra_env: dict):
        self.proc = subprocess.Popen(remoteops_argv(*args), cwd=cwd,  # Ctrl-C reaches it
                                     env=dict(os.environ, COLUMNS="200", PYTHONFAULTHANDLER="1",
                                              **extra_env),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float = 150) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"serve ended ({self.proc.wait()}): {self.seen}")
            self.seen.append(line)
            if text in line:
                return self.seen
        raise AssertionError(f"no {text!r} in {self.seen}")

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:  # say where it hangs: every thread's stack
            masks = _signals(self.proc.pid)
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(10)
            while (line := self.lines.get(timeout=5)) is not None:
                self.seen.append(line)
            raise AssertionError(f"serve did not end within 30 s of its Ctrl-C ({masks}; this "
                                 f"test process: {_signals(os.getpid())}):\n"
                                 + "\n".join(self.seen[-80:])) from None
        while (line := self.lines.get(timeout=5)) is not None:
            self.seen.append(line)
        return code


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def one_line_error(res: subprocess.CompletedProcess) -> str:
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in out, out
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_adapter_served_over_ssh_forwarded_compared_refused_and_stopped(cli, laptop,
                                                                       served_root):
    port, local = free_port("127.0.0.1"), free_port("127.0.0.1")
    fg = Foreground(["serve", "--host", "box", "--stage", "tiny", "--port", str(port),
                     "--local-port", str(local)], laptop, env(served_root))
    try:
        seen = fg.wait_for("forwarding over SSH until Ctrl-C")
        assert any(f"serving stage tiny (adapter, run {RUN}) on box" in s for s in seen), seen
        assert f"URL: http://127.0.0.1:{local}/v1" in "\n".join(seen)
        # the server side listens on its loopback address only; the laptop reaches it via SSH
        assert listening_addresses(port) == ["0100007F"], listening_addresses(port)
        got = post(f"http://127.0.0.1:{local}/v1", {"model": "tiny", "max_tokens": 4,
                                                    "min_tokens": 4, "temperature": 0,
                                                    "messages": [{"role": "user",
                                                                  "content": "你好"}]})
        assert got["usage"]["completion_tokens"] == 4 and got["choices"][0]["message"]["content"]

        res = cli("chat", "--host", "box", "--max-tokens", "6", "-p", "Write one line.",
                  env=env(served_root))
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.strip() and "tokens, first token after" in res.stderr

        again = cli("serve", "--host", "box", "--stage", "tiny", "--port", str(port),
                    "--detach", env=env(served_root))
        line = one_line_error(again)
        assert f"port {port} is already served here: stage tiny (adapter, run {RUN})" in line
        assert f"'invoke serve --stop --port {port}'" in line

        res = cli("chat", "--host", "box", "--compare", "base", "--limit", "2", "--max-tokens",
                  "5", "--report", env=env(served_root))
        assert res.returncode == 0, res.stdout + res.stderr
        assert "tiny (adapter)" in res.stdout and "base" in res.stdout
        run = served_root / "outputs" / "training_sync" / RUN
        record = json.loads((run / "chat_compare_tiny.json").read_text())
        assert len(record["rows"]) == 2 and record["rows"][0]["prompt"]
        summary = (run / "TRAINING_SUMMARY.md").read_text()
        assert "## Chat: `tiny` adapter vs base" in summary and "| prompt | adapter | base |" \
            in summary

        res = cli("status", "--host", "box", env=env(served_root))
        assert f"serving on port {port}: stage tiny (adapter, run {RUN}) running" in res.stdout
    finally:
        code = fg.interrupt()
    assert code == 0 and "forwarding stopped" in fg.seen[-1], fg.seen
    res = cli("serve", "--host", "box", "--status", "--json", env=env(served_root))
    servers = json.loads(res.stdout)["servers"]
    assert [(s["port"], s["status"]) for s in servers] == [(port, "ready")]  # still served
    pid = servers[0]["pid"]

    res = cli("serve", "--host", "box", "--stop", "--port", str(port), env=env(served_root))
    assert res.returncode == 0 and f"stopped port {port} on box" in res.stdout, res.stderr
    assert serving_pids(port) == [] and not pid_alive(pid)
    assert port_is_free(port) and not (served_root / ".remoteops" / "serve" / f"{port}.json"
                                       ).exists()


def test_gguf_served_over_ssh_chat_through_its_own_tunnel_and_stopped(cli, laptop,
                                                                      served_root):
    if not (served_root / "outputs" / "quant" / "tiny" / "gguf" / "model-q4_k_m.gguf").is_file():
        if os.environ.get("CI_REQUIRE_QUANT") == "1":
            pytest.fail("llama-cpp-python is required (CI_REQUIRE_QUANT=1)")
        pytest.skip("llama-cpp-python is not installed")
    port = free_port("127.0.0.1")
    res = cli("serve", "--host", "box", "--format", "gguf:q4_k_m", "--port", str(port),
              "--detach", env=env(served_root))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"serving stage tiny (gguf:q4_k_m, run {RUN}) on box" in res.stdout
    assert listening_addresses(port) == ["0100007F"]
    try:
        res = cli("chat", "--host", "box", "--port", str(port), "--max-tokens", "8", "--json",
                  "-p", "你好", env=env(served_root))
        assert res.returncode == 0, res.stdout + res.stderr
        answer = json.loads(res.stdout)
        assert answer["model"] == "tiny" and answer["tokens"] >= 1 and answer["text"]
        assert answer["first_token_s"] > 0

        res = cli("chat", "--host", "box", "--port", str(port), "--compare", "base",
                  env=env(served_root))
        assert "--compare base needs the adapter server" in one_line_error(res)
    finally:
        res = cli("serve", "--host", "box", "--stop", env=env(served_root))
    assert res.returncode == 0 and f"stopped port {port} on box" in res.stdout, res.stderr
    assert serving_pids(port) == [] and port_is_free(port)


def test_local_target_serves_without_a_tunnel_and_bad_input_is_one_line(cli, laptop, home,
                                                                         served_root):
    where = ("--host", "local", "--project-root", str(served_root))
    for args, expected in (
            (("--format", "gguf:q9_9"), "stage 'tiny' has no GGUF q9_9"),
            (("--format", "onnx"), "--format 'onnx' is not understood; use adapter, or gguf:"),
            (("--stage", "nope"), "stage 'nope' has no adapter on this server"),
            (("--port", "80"), "--port '80' is not a usable port")):
        assert expected in one_line_error(cli("serve", *where, *args))
    res = cli("chat", *where, "-p", "hi")
    assert "nothing is served on local; start it with 'invoke serve'" in one_line_error(res)
    fmt = "gguf:q4_k_m" if (served_root / "outputs" / "quant" / "tiny" / "gguf" /
                            "model-q4_k_m.gguf").is_file() else "adapter"
    port = free_port("127.0.0.1")
    res = cli("serve", *where, "--format", fmt, "--port", str(port))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"URL: http://127.0.0.1:{port}/v1" in res.stdout  # no tunnel: the server's own port
    try:
        res = cli("chat", *where, "--max-tokens", "4", "-p", "你好")
        assert res.returncode == 0 and res.stdout.strip(), res.stdout + res.stderr
        # an sshd that forbids forwarding: chat says so and what to change, in one line
        folder = sshd_folder()
        strict = start_sshd(folder, extra_config="AllowTcpForwarding no")
        try:
            ssh_alias(home, "strict", strict)
            trust(laptop, strict)
            res = cli("chat", "--host", "strict", "-p", "hi", env=env(served_root))
        finally:
            strict.stop()
            shutil.rmtree(folder, ignore_errors=True)
        line = one_line_error(res)
        assert "the server's sshd refused to forward the port" in line
        assert "AllowTcpForwarding local (or yes)" in line
    finally:
        res = cli("serve", *where, "--stop", "--port", str(port))
    assert res.returncode == 0 and f"stopped port {port} on local" in res.stdout
    assert serving_pids(port) == [] and port_is_free(port)
