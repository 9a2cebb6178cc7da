"""The built-in stage executors: ``process`` (the default) and ``torchrun``.

``[stages.X] executor = "process"`` runs the stage's process as it is. ``executor =
"torchrun"`` runs it under ``python -m torch.distributed.run`` (torchrun), with
``nproc_per_node`` processes (default: the GPUs this machine shows, 1 without any),
optionally ``nnodes`` and ``rdzv_endpoint = "host:port"`` for several machines (c10d
rendezvous; ``rdzv_id`` names the job, default ``remoteops-<stage>``). A run that
``remote-train --host a,b`` spans over several machines (``nnodes`` > 1, see
``remoteops/common/multi_node.py``) gives each machine's runner its ``node_rank`` and the
rendezvous: then the static rendezvous is used (node rank 0 is the first host, so global
rank 0, which writes the signals, metrics and adapter, runs where ``collect`` looks), with
``rdzv_timeout`` seconds (default 600) for the other machines to arrive. A built-in training
stage runs ``torchrun ... -m remoteops.agent train ...``: the trainer trains data-parallel
(DDP; gloo on the CPU), rank 0 writes the signals and metrics, and the health verdict is
agreed by every rank before each optimizer step. A command stage runs under torchrun when
its command is a Python script or module (``python train.py ARGS``, ``train.py ARGS``,
``python -m pkg.train ARGS``); any other command (a shell script, a pipe) is refused with
a one-line error before it starts: call torchrun inside it and keep ``executor = "process"``.
"""

import os
import shutil
import subprocess

from remoteops.api import Executor, hookimpl

TORCHRUN_OPTIONS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_id", "rdzv_port",
                    "rdzv_timeout")


def visible_gpus(env=None) -> int:
    """How many GPUs a process started here would see (no torch: CUDA_VISIBLE_DEVICES,
    else ``nvidia-smi -L``)."""
    env = os.environ if env is None else env
    chosen = env.get("CUDA_VISIBLE_DEVICES")
    if chosen is not None:
        ids = []
        for item in chosen.split(","):
            item = item.strip()
            if not item or item.startswith("-"):
                break  # CUDA ignores everything from an invalid id on
            ids.append(item)
        return len(ids)
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=20, text=True).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


class ProcessExecutor(Executor):
    """The stage's process as it is, one process on this machine."""

    name = "process"

    @classmethod
    def check_options(cls, stage, table):
        if "slurm" in table:
            raise ValueError(f"stages.{stage}.slurm holds Slurm settings but the stage runs as a "
                             f"plain process; add executor = \"slurm\" to [stages.{stage}] or "
                             f"remove [stages.{stage}.slurm].")
        given = [k for k in TORCHRUN_OPTIONS if k in table]
        if given:
            raise ValueError(f"stages.{stage}.{given[0]} is a torchrun setting but the stage runs "
                             f"as a plain process; add executor = \"torchrun\" to [stages.{stage}] "
                             f"or remove {given[0]}.")


class TorchrunExecutor(Executor):
    """The stage's Python program under torchrun, ``nproc_per_node`` processes per machine."""

    name = "torchrun"
    options = TORCHRUN_OPTIONS

    @classmethod
    def check_options(cls, stage, table):
        # nnodes > 1 without rdzv_endpoint is a run spanning several hosts: remote-train
        # --host a,b gives each machine its node rank and the endpoint (laptop/multi_node)
        for key in ("rdzv_port", "rdzv_timeout"):
            if key in table and (not isinstance(table[key], int) or isinstance(
                    table[key], bool) or not 0 < table[key] < (65536 if key == "rdzv_port"
                                                                else 86400 * 7)):
                raise ValueError(f"stages.{stage}.{key} is {table[key]!r}; write a whole number "
                                 f"of {'1-65535' if key == 'rdzv_port' else 'seconds'}.")

    @property
    def nproc_per_node(self) -> int:
        return int(self.table.get("nproc_per_node") or max(1, visible_gpus()))

    def _details(self):
        out = {"nproc_per_node": self.nproc_per_node, "nnodes": int(self.table.get("nnodes", 1))}
        for key in ("rdzv_endpoint", "node_rank", "hosts"):
            if self.table.get(key) is not None:
                out[key] = self.table[key]
        return out

    def launcher(self, python: str) -> list[str]:
        """``python -m torch.distributed.run`` and its options (what ``torchrun`` runs)."""
        args = [python, "-m", "torch.distributed.run"]
        nnodes = int(self.table.get("nnodes", 1))
        endpoint = self.table.get("rdzv_endpoint")
        if nnodes == 1 and not endpoint:
            args += ["--standalone", "--nnodes", "1"]  # a free local port, no other machine
        elif self.table.get("node_rank") is not None:  # one node of a spanning run
            args += ["--nnodes", str(nnodes), "--node_rank", str(self.table["node_rank"]),
                     "--rdzv_backend", "static", "--rdzv_endpoint", endpoint, "--rdzv_id",
                     self.table["rdzv_id"], "--rdzv_conf",
                     f"timeout={int(self.table.get('rdzv_timeout') or 600)}",
                     "--max_restarts", "0"]
        elif not endpoint:
            raise ValueError(f"stage {self.stage} has nnodes = {nnodes}: start it on {nnodes} "
                             f"hosts at once (invoke remote-train --host a,b or --host @GROUP), "
                             f"or set rdzv_endpoint = \"HOST:PORT\" and start the other "
                             f"machines yourself.")
        else:
            args += ["--nnodes", str(nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint",
                     endpoint, "--rdzv_id", self.table.get("rdzv_id") or f"remoteops-{self.stage}"]
        return args + ["--nproc_per_node", str(self.nproc_per_node)]

    def _wrap(self, launch):
        if launch.module:
            return [*self.launcher(launch.python), "-m", launch.module, *launch.args]
        if launch.script:
            return [*self.launcher(launch.python), launch.script, *launch.args]
        raise ValueError(f"stage {launch.stage}: executor \"torchrun\" starts a Python program, "
                         f"and the command is not one (write command = \"python train.py ...\", "
                         f"or keep executor = \"process\" and call torchrun inside the command).")


@hookimpl
def register_executors(register):
    register("process", ProcessExecutor)
    register("torchrun", TorchrunExecutor)
