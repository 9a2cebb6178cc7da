"""The built-in ``slurm`` executor: each stage attempt is a Slurm batch job.

``[stages.X] executor = "slurm"`` submits the stage's command (the built-in trainer, or a
command stage's ``bash -c ...``) with ``sbatch`` from the machine the runner runs on (a
Slurm login node reached over SSH like any host), chained after the run's previous Slurm
job with ``--dependency=afterok`` and ``--kill-on-invalid-dep=yes``. Options come from
``[slurm]`` and, stage by stage, ``[stages.X.slurm]`` (which wins). Consecutive Slurm
stages are submitted at once, as one chain (``chain = "upfront"``, the default): each job
runs the stage through the agent's ``stage-job`` (the ``before_stage`` and ``after_stage``
hooks and the stage's own verdict, inside the job), so a stage judged failed exits non-zero
and Slurm itself cancels the jobs behind it. ``chain = "stage"`` submits one job at a time::

    [slurm]
    partition = "gpu"
    account = "my-lab"
    time = "4:00:00"        # sbatch --time
    extra = ["--qos=normal"]
    chain = "upfront"       # or "stage"

    [stages.style.slurm]
    gres = "gpu:2"
    cpus = 8                # --cpus-per-task
    mem = "64G"

The runner follows the job (one ``squeue`` per poll), copies its output file into the
stage's log (``logs -f``, the health watch), ``cancel`` is an ``scancel``, and a job Slurm
ends maps onto the failure classes: TIMEOUT, PREEMPTED and NODE_FAIL resume from the latest
checkpoint, OUT_OF_MEMORY retries with a smaller batch, CANCELLED stops the run. A job the
cluster requeues itself resumes from the latest checkpoint too.

``nproc_per_node = N`` on a Slurm stage runs its Python program (the built-in trainer, or a
``python train.py`` command) under torchrun inside the job, N processes on the job's node
(ask Slurm for the CPUs or GPUs they need in ``[stages.X.slurm]``).
"""

import dataclasses

from remoteops.api import Executor, hookimpl

# keys of [slurm] / [stages.X.slurm] that become #SBATCH lines (the config schema checks them)
SBATCH_KEYS = ("partition", "account", "gres", "time", "cpus", "mem", "extra")


class SlurmExecutor(Executor):
    """The stage's process as a Slurm batch job, followed until it ends."""

    name = "slurm"
    options = ("slurm", "nproc_per_node")

    @classmethod
    def check_options(cls, stage, table):
        given = [k for k in ("nnodes", "rdzv_endpoint", "rdzv_id") if k in table]
        if given:
            raise ValueError(f"stages.{stage}.{given[0]} is a torchrun setting for several "
                             f"machines but a Slurm stage runs its job on one node; keep "
                             f"nproc_per_node (torchrun inside the job) and remove {given[0]}.")
        for line in (table.get("slurm") or {}).get("extra") or []:
            if "\n" in line or not line.removeprefix("#SBATCH").strip().startswith("-"):
                raise ValueError(f"stages.{stage}.slurm.extra has {line!r}; each item is one "
                                 f"sbatch option, e.g. \"--qos=high\".")

    @property
    def sbatch_options(self) -> dict:
        """``[slurm]`` with ``[stages.X.slurm]`` over it."""
        merged = dict(self.settings.get("slurm") or {}) if self.settings is not None else {}
        merged.update(self.table.get("slurm") or {})
        return merged

    def _details(self):
        details = {k: v for k, v in self.sbatch_options.items() if k in SBATCH_KEYS and v}
        if self.table.get("nproc_per_node"):
            details["nproc_per_node"] = int(self.table["nproc_per_node"])
        return details

    def _wrap(self, launch):
        """With ``nproc_per_node``, the stage's Python program under torchrun inside the job
        (one node, ``--standalone``): the built-in trainer trains data-parallel there."""
        nproc = self.table.get("nproc_per_node")
        if not nproc:
            return launch.argv
        launcher = [launch.python, "-m", "torch.distributed.run", "--standalone", "--nnodes",
                    "1", "--nproc_per_node", str(int(nproc))]
        if launch.module:
            return [*launcher, "-m", launch.module, *launch.args]
        if launch.script:
            return [*launcher, launch.script, *launch.args]
        raise ValueError(f"stage {launch.stage}: nproc_per_node runs a Python program under "
                         f"torchrun inside the job, and the command is not one (write command "
                         f"= \"python train.py ...\", or remove nproc_per_node).")

    def chain_key(self):
        # [slurm] chain = "upfront" (the default): consecutive Slurm stages are submitted at
        # once, each job afterok on the one before; "stage": one job at a time
        return "slurm" if self.sbatch_options.get("chain", "upfront") == "upfront" else None

    def run_chain(self, runner, stages):
        from remoteops.api import run_slurm_chain

        return run_slurm_chain(runner, stages)

    def run(self, launch, process, log_path, watch=None, **callbacks):
        from remoteops.api import run_slurm_job

        launch = dataclasses.replace(launch, argv=self.wrap(launch))
        return run_slurm_job(launch, log_path, watch, self.sbatch_options, process.cwd,
                             **callbacks)


@hookimpl
def register_executors(register):
    register("slurm", SlurmExecutor)
