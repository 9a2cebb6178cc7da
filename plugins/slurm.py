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
"""

from remoteops.api import Executor, hookimpl

# keys of [slurm] / [stages.X.slurm] that become #SBATCH lines (the config schema checks them)
SBATCH_KEYS = ("partition", "account", "gres", "time", "cpus", "mem", "extra")


class SlurmExecutor(Executor):
    """The stage's process as a Slurm batch job, followed until it ends."""

    name = "slurm"
    options = ("slurm",)

    @classmethod
    def check_options(cls, stage, table):
        given = [k for k in ("nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_id")
                 if k in table]
        if given:
            raise ValueError(f"stages.{stage}.{given[0]} is a torchrun setting but the stage runs "
                             f"as a Slurm job; ask Slurm for the resources in "
                             f"[stages.{stage}.slurm] (gres, cpus) or remove {given[0]}.")
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
        return {k: v for k, v in self.sbatch_options.items() if k in SBATCH_KEYS and v}

    def chain_key(self):
        # [slurm] chain = "upfront" (the default): consecutive Slurm stages are submitted at
        # once, each job afterok on the one before; "stage": one job at a time
        return "slurm" if self.sbatch_options.get("chain", "upfront") == "upfront" else None

    def run_chain(self, runner, stages):
        from remoteops.api import run_slurm_chain

        return run_slurm_chain(runner, stages)

    def run(self, launch, process, log_path, watch=None, **callbacks):
        from remoteops.api import run_slurm_job

        return run_slurm_job(launch, log_path, watch, self.sbatch_options, process.cwd,
                             **callbacks)


@hookimpl
def register_executors(register):
    register("slurm", SlurmExecutor)
