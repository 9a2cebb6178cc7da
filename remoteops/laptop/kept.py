"""A kept connection to one server, seen from a command: find it, ask it, start it.

A deploy over SSH pays a login (several round trips), the login shell, Python's start
and the agent's imports before the server does any work: on loopback that is most of
a redeploy, over a 100 ms link most of the rest. After a deploy the laptop leaves a
small process behind (``laptop/keeper``, like OpenSSH's ``ControlPersist``): it holds
the logged-in connection and a resident agent on the server (``server/resident``) for
``[ssh] persist`` seconds (default 600; 0: never). The next deploy sends its request
through a local Unix socket instead of logging in; the server forks an agent that has
everything imported already.

Nothing depends on it: when there is no keeper, it is busy, or it does not answer
within the connect timeout, the command connects as always (and, when none was
listening, starts one as it ends). A keeper serves exactly one resolved host: the key
in its socket's name covers the host, port, user, key files, the text of the
known_hosts files and ssh config, the remote Python and this toolkit's code, so a
changed host key or setting never reuses an old connection. Its socket lives in a
folder only this user can open (``$XDG_RUNTIME_DIR/remoteops`` or
``/tmp/remoteops-<uid>``, mode 0700, checked) and it answers only this user.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from remoteops.common.errors import ConnectError, timed_out
from remoteops.common.kept_wire import (END, EXIT, HEAD, INPUT, LOST, NOT_STARTED, OUT, STARTED,
                                        Frames, FrameError, frame, json_frame, read_frames,
                                        REQUEST)

PROTOCOL = 1
_SEND = 1 << 20
RETRY_SECONDS = 300  # after a keeper could not start, commands do not start another for this


def runtime_dir() -> Path | None:
    """This user's private folder for keeper sockets (None: none can be made safely)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(base) / "remoteops" if base else Path(f"/tmp/remoteops-{os.getuid()}")
    if len(str(folder)) > 70:  # a socket's path has at most 107 bytes
        return None
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()
    except OSError:
        return None
    if not folder.is_dir() or folder.is_symlink() or st.st_uid != os.getuid() or \
            st.st_mode & 0o077:
        return None  # someone else's, or open to others: no keeper
    return folder


def _code_stamp() -> list:
    """This toolkit's laptop-side code that a keeper runs (an update means a new keeper)."""
    here = Path(__file__).resolve().parent
    files = [here / "kept.py", here / "keeper.py", here / "agent_stream.py",
             here.parent / "common" / "kept_wire.py"]
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append([f.name, st.st_mtime_ns, st.st_size])
    return out


def _text(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def keeper_key(spec: str, entry: dict, endpoint, python: str, client: str,
               ssh_config: Path) -> str:
    """The identity of a kept connection (see the module)."""
    from remoteops import __version__

    ends = dataclasses.asdict(endpoint)
    ends["known_hosts"] = [[str(p), _text(p)] for p in endpoint.known_hosts]
    keys = [[k, _text(Path(k))] for k in endpoint.identity_files]
    body = json.dumps([PROTOCOL, __version__, _code_stamp(), spec, entry, ends, keys, python,
                       client, _text(ssh_config), os.environ.get("HOME", "")],
                      sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:24]


@dataclasses.dataclass
class Kept:
    """The kept connection for one resolved host (it may or may not be running)."""

    key: str
    folder: Path
    spec: str               # --host as the user gave it (the keeper resolves it again)
    project_dir: Path
    persist: float
    start_timeout: float    # how long a request may wait for the keeper to start it
    client: str = "auto"    # the keeper's [ssh] client (keeper_client)
    wanted: bool = False    # none was listening: start one when the command ends

    @property
    def socket_path(self) -> Path:
        return self.folder / f"{self.key}.sock"

    @property
    def lock_path(self) -> Path:
        return self.folder / f"{self.key}.lock"

    @property
    def log_path(self) -> Path:
        return self.folder / f"{self.key}.log"

    @property
    def info_path(self) -> Path:
        return self.folder / f"{self.key}.json"

    @property
    def failed_path(self) -> Path:
        """Why the last keeper could not start (its time: when to try again)."""
        return self.folder / f"{self.key}.failed"

    def ready(self) -> bool:
        """A keeper seems to listen (its socket is there; ``request`` finds out for sure)."""
        return self.socket_path.exists()

    def request(self, argv: list[str]) -> "KeptRequest | None":
        """``argv`` started on the server through the keeper, or None (go the usual way)."""
        path = self.socket_path
        if not path.exists():
            self.wanted = True
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.start_timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json_frame(REQUEST, {"argv": argv}))
            frames = Frames()
            got: list = []
            while not got:
                data = sock.recv(65536)
                if not data:
                    break
                got = frames.feed(data)
        except ConnectionRefusedError:  # a keeper that died: its socket is left behind
            sock.close()
            self.wanted = True
            return None
        except (OSError, FrameError):
            sock.close()
            return None
        if not got or got[0][0] != STARTED:
            sock.close()
            return None
        sock.settimeout(None)
        return KeptRequest(sock, frames, got[1:])

    def run(self, argv: list[str], timeout: float, name: str) -> tuple[str, str, int] | None:
        """``argv`` run through the keeper with no input: its stdout, stderr and exit code
        (None: it did not start; go the usual way)."""
        request = self.request(argv)
        if request is None:
            return None
        out: list[bytes] = []
        err: list[bytes] = []
        request.sock.settimeout(timeout)
        try:
            try:
                request.close_input()
            except OSError:
                pass  # a request that reads no input may have ended already: its frames say
            for kind, payload in request.frames_in():
                (out if kind == OUT else err).append(payload)
        finally:
            request.close()
        if request.code is None:
            if isinstance(request.error, socket.timeout):
                raise timed_out(timeout, name)
            raise kept_lost(name)
        return (b"".join(out).decode("utf-8", "replace"),
                b"".join(err).decode("utf-8", "replace"), request.code)

    def spawn(self) -> None:
        """Start a keeper in the background (it gives up quietly if one is running); not
        within ``RETRY_SECONDS`` of one that could not start (no Python there, no agent)."""
        import time

        try:
            if time.time() - self.failed_path.stat().st_mtime < RETRY_SECONDS:
                return
        except OSError:
            pass
        try:
            with open(self.log_path, "ab") as log:
                subprocess.Popen([sys.executable, "-m", "remoteops.laptop.keeper", "--host",
                                  self.spec, "--key", self.key], cwd=self.project_dir,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 env={**os.environ, "REMOTEOPS_SSH__CLIENT": self.client},
                                 start_new_session=True, close_fds=True)
        except OSError:
            pass  # the next command connects as always


class KeptRequest:
    """One request under way through a keeper: ``send`` its stdin, frames for the rest."""

    def __init__(self, sock: socket.socket, frames: Frames, early: list):
        self.sock, self.frames, self.early = sock, frames, early
        self.code: int | None = None  # None once the frames ended: the request was lost
        self.error: Exception | None = None  # why the frames ended early, if they did
        self._lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._lock:
            for start in range(0, len(data), _SEND):
                self.sock.sendall(frame(INPUT, data[start:start + _SEND]))

    def send_file(self, fh, start: int, length: int, prefix: bytes = b"") -> None:
        """One input frame: ``prefix``, then ``length`` bytes of ``fh`` from ``start`` moved
        by the kernel (``sendfile``: no copy through Python; the keeper splices them on)."""
        if len(prefix) + length > _SEND + 64:
            raise ValueError("a frame of at most one chunk")
        with self._lock:
            self.sock.sendall(HEAD.pack(INPUT, len(prefix) + length) + prefix)
            done = 0
            while done < length:
                n = os.sendfile(self.sock.fileno(), fh.fileno(), start + done, length - done)
                if n <= 0:
                    raise EOFError("the file ended before the frame")
                done += n

    def close_input(self) -> None:
        with self._lock:
            self.sock.sendall(frame(END))

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def frames_in(self):
        """Every frame until the exit code (``code``), or until the keeper or the
        connection went away (``code`` stays None). The frames that came with the start
        (``early``) count as any other: a short request's exit code may be one of them."""
        def arriving():
            yield from self.early
            yield from read_frames(self.sock.recv, self.frames)

        try:
            for kind, payload in arriving():
                if kind == EXIT:
                    self.code = int(payload)
                    return
                if kind in (LOST, NOT_STARTED):
                    break
                yield kind, payload
        except (OSError, ValueError) as exc:
            self.error = exc


def kept_lost(name: str) -> ConnectError:
    """A request whose keeper or connection went away before its exit code."""
    return ConnectError(f"connection lost to {name} (the kept connection ended); check the "
                        "network and run the command again.")


def running() -> list[dict]:
    """The keepers of this user that are alive (their info, ``key`` and ``log`` added)."""
    folder = runtime_dir()
    out = []
    for info_path in sorted(folder.glob("*.json")) if folder is not None else []:
        try:
            info = json.loads(info_path.read_text())
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # gone (its files are removed by the next keeper of that key)
        out.append({**info, "key": info_path.stem, "log": str(info_path.with_suffix(".log")),
                    "socket": str(info_path.with_suffix(".sock"))})
    return out


def close(info: dict, wait: float = 5.0) -> bool:
    """Stop one keeper (SIGTERM: it closes its connection and removes its socket)."""
    import signal
    import time

    try:
        os.kill(int(info["pid"]), signal.SIGTERM)
    except OSError:
        return True
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not os.path.exists(info["socket"]):
            return True
        time.sleep(0.05)
    return False


def kept_for(settings, spec: str, entry: dict, endpoint, python: str) -> Kept | None:
    """The kept connection a command to this host may use (None: ``persist`` is 0, or
    ``--trust-host``, which must log in to record the key)."""
    persist = float(settings["ssh.persist"])
    if persist <= 0 or endpoint.trust_host or not hasattr(socket, "AF_UNIX") or \
            not hasattr(os, "getuid"):
        return None  # off, a login that must record a key, or not a POSIX laptop
    folder = runtime_dir()
    if folder is None:
        return None
    ssh_config = Path(os.path.expanduser(settings["ssh.config_file"]))
    client = keeper_client(settings)
    key = keeper_key(spec, entry, endpoint, python, client, ssh_config)
    return Kept(key, folder, spec, settings.project_dir, persist,
                max(2.0, float(settings["ssh.connect_timeout"])), client)


def keeper_client(settings) -> str:
    """The SSH client a keeper holds its connection with: ``[ssh] client`` when you chose
    one, else ``auto``. paramiko is the default for a command's small requests because
    ``ssh`` logs in with two more round trips; a keeper logs in once, in the background,
    and then moves a full deploy's bytes in C (on loopback 1.7 s against 2.0-2.6 s for a
    145 MB re-upload), as a command's own deploy of the whole bundle does
    (``SSHTarget.prefer_openssh``)."""
    chosen = str(settings["ssh.client"])
    return chosen if settings.source("ssh.client") != "default" else "auto"


__all__ = ["Kept", "KeptRequest", "kept_for", "kept_lost", "keeper_client", "runtime_dir",
           "keeper_key", "running", "close"]
