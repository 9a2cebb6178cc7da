"""A private single-node Slurm cluster for tests: munged, slurmctld and slurmd.

Debian's Slurm 22.05 and munge, started as plain background processes (no systemd) under
one temporary folder: a private munge key and socket, a ``slurm.conf`` on free ports,
state, spool and logs. Every client finds the cluster through ``SLURM_CONF``
(``cluster.env``). ``stop()`` cancels the jobs, stops each daemon by the PID it was started
with (SIGTERM, then SIGKILL) and kills a ``slurmstepd`` of this cluster that outlived
``slurmd``, so nothing is left running. No accounting database: ``sacct`` answers
"accounting storage is disabled", and final states come from ``scontrol`` (finished jobs stay
known for ``MinJobAge``) or the ``jobcomp/filetxt`` file.

Written from the recipe in ``shared/slurm.md`` (the pitfalls: ``batch_sched_delay=0`` or
every job waits ~3 s; no cgroups here, so ``proctrack/linuxproc`` and ``task/none``; PID 1
reaps late, so a zombie counts as dead). ``cred_expire=10`` (default 120): Slurm holds a
requeued job until its last credential expires, and a test should not wait two minutes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.harness.install import MissingTool, ensure_tools

SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch")


def why_no_slurm() -> str | None:
    """None when a cluster can be started here (installing the packages when missing and
    allowed), else the reason (a test skips with it)."""
    if os.geteuid() != 0:
        return "the Slurm tests start slurmctld/slurmd as root; run them as root"
    try:
        ensure_tools(*SLURM_TOOLS)
    except MissingTool as exc:
        return str(exc)
    except subprocess.CalledProcessError as exc:
        return f"installing Slurm failed: {exc}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """Running and not a zombie (PID 1 here reaps seconds late)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


class SlurmCluster:
    """One node (this machine, 127.0.0.1) in partition ``debug``, ``cpus`` CPUs advertised."""

    def __init__(self, base: Path, cpus: int = 4):
        self.base, self.cpus = base, cpus
        self.conf = base / "etc" / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: dict[str, int] = {}

    # -- clients --------------------------------------------------------------------------
    def run(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30,
                              check=check)

    def states(self, *ids: str) -> dict[str, str]:
        """``{job id: state}`` of the given jobs (every job when none), finished ones too."""
        args = ["squeue", "-h", "-t", "all", "-o", "%i|%T"] + (["-j", ",".join(ids)] if ids
                                                                else [])
        out = self.run(*args).stdout
        return dict(line.split("|", 1) for line in out.split() if "|" in line)

    def wait_state(self, job: str, wanted: set[str], timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.states(job).get(job)
            if state in wanted:
                return state
            time.sleep(0.2)
        raise AssertionError(f"job {job} is {self.states(job).get(job)}, not {wanted}, after "
                             f"{timeout} s")

    def log(self, name: str = "slurmctld") -> str:
        path = self.base / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    # -- life -----------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        shutil.rmtree(self.base, ignore_errors=True)
        for sub in ("etc", "state", "spool", "log", "munge"):
            (self.base / sub).mkdir(parents=True)
        self.base.chmod(0o755)
        munge = self.base / "munge"
        munge.chmod(0o755)  # munged refuses a group- or other-writable folder
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = munge / "munge.socket.2"
        self._daemon("munged", ["munged", "-F", "--force", f"--key-file={key}",
                                f"--socket={socket_path}", f"--pid-file={munge}/munged.pid",
                                f"--seed-file={munge}/munged.seed"])
        self._until(socket_path.exists, "munged made no socket", 5)
        self.conf.write_text(self._config(socket_path))
        self._daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._until(lambda: "is UP" in self.run("scontrol", "ping").stdout, "slurmctld is not up",
                    60)
        self._daemon("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._until(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle",
                    "the node is not idle", 60)
        return self

    def _config(self, munge_socket: Path) -> str:
        b = self.base
        return f"""ClusterName=remoteopstest
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool
SlurmctldPidFile={b}/state/slurmctld.pid
SlurmdPidFile={b}/spool/slurmd.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={b}/log/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=2
Waittime=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _daemon(self, name: str, args: list[str]) -> None:
        with open(self.base / "log" / f"{name}.stdout", "ab") as out:
            proc = subprocess.Popen(args, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.pids[name] = proc.pid
        self._procs = getattr(self, "_procs", []) + [proc]

    def _until(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.05)
        logs = {name: self.log(name)[-600:] for name in ("slurmctld", "slurmd")}
        self.stop()
        raise RuntimeError(f"{what} after {timeout} s; see {self.base}/log: {logs}")

    def stop(self) -> None:
        """Cancel every job, stop the daemons by PID, leave no process behind."""
        if self.pids.get("slurmctld") and _alive(self.pids["slurmctld"]):
            jobs = self.run("squeue", "-h", "-o", "%i").stdout.split()
            if jobs:
                self.run("scancel", *jobs)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-t", "R,CG,CF,S").stdout.strip():
                    time.sleep(0.1)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None or not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for proc in getattr(self, "_procs", []):
            try:
                proc.wait(5)  # reap our own children
            except subprocess.TimeoutExpired:
                pass
        for pid in self.leftovers():
            os.kill(pid, signal.SIGKILL)

    def leftovers(self) -> list[int]:
        """Live processes of this cluster: anything whose environment has our SLURM_CONF
        and whose program is a Slurm or munge daemon (a slurmstepd that outlived slurmd)."""
        found = []
        mark = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                exe = os.readlink(entry / "exe")
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if (Path(exe).name in ("slurmstepd", "slurmd", "slurmctld", "munged")
                    and mark in environ.split(b"\0") and _alive(int(entry.name))):
                found.append(int(entry.name))
        return found
