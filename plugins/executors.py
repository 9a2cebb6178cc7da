"""The built-in stage executors: ``process`` (the default) and ``torchrun``.

``[stages.X] executor = "process"`` runs the stage's process as it is. ``executor =
"torchrun"`` runs it under ``python -m torch.distributed.run`` (torchrun), with
``nproc_per_node`` processes (default: the GPUs this machine shows, 1 without any),
optionally ``nnodes`` and ``rdzv_endpoint = "host:port"`` for several machines (c10d
rendezvous; ``rdzv_id`` names the job, default ``remoteops-<stage>``). A built-in training
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

TORCHRUN_OPTIONS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_id")


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
        nnodes = table.get("nnodes", 1)
        if nnodes > 1 and not table.get("rdzv_endpoint"):
            raise ValueError(f"stages.{stage}.nnodes is {nnodes}: several machines meet at a "
                             f"rendezvous; set rdzv_endpoint = \"HOST:PORT\" (the first machine) "
                             f"in [stages.{stage}].")

    @property
    def nproc_per_node(self) -> int:
        return int(self.table.get("nproc_per_node") or max(1, visible_gpus()))

    def _details(self):
        out = {"nproc_per_node": self.nproc_per_node, "nnodes": int(self.table.get("nnodes", 1))}
        if self.table.get("rdzv_endpoint"):
            out["rdzv_endpoint"] = self.table["rdzv_endpoint"]
        return out

    def launcher(self, python: str) -> list[str]:
        """``python -m torch.distributed.run`` and its options (what ``torchrun`` runs)."""
        args = [python, "-m", "torch.distributed.run"]
        nnodes = int(self.table.get("nnodes", 1))
        endpoint = self.table.get("rdzv_endpoint")
        if nnodes == 1 and not endpoint:
            args += ["--standalone", "--nnodes", "1"]  # a free local port, no other machine
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
