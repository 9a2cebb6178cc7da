"""The agent command a Slurm job of an up-front chain runs: ``stage-job`` (the work is
``server/slurm_job_entry``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("stage-job", context_settings={"ignore_unknown_options": True})
@click.option("--root", required=True, help="The project root (the job's working folder).")
@click.option("--run-dir", required=True, help="The run directory.")
@click.option("--stage", "name", required=True, help="The stage this job runs.")
@click.option("--kind", type=click.Choice(["train", "command"]), required=True,
              help="The built-in trainer or a command.")
@click.option("--output", required=True, help="The job's output file (the stage's output "
              "is appended to it).")
@click.option("--verdict", required=True, help="Where the stage's verdict (JSON) is written.")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, required=True)
def stage_job(root, run_dir, name, kind, output, verdict, argv):
    """Run one stage inside its Slurm job: before_stage hooks, the stage with its health
    watch, its verdict, evaluation (training), after_stage hooks. Exits non-zero unless the
    stage is done, so Slurm cancels the jobs chained after it. Written into job scripts by
    the runner; not for people."""
    from remoteops.server.slurm_job_entry import run_stage_job

    sys.exit(run_stage_job(Path(root), Path(run_dir), name, kind, list(argv), Path(output),
                           Path(verdict)))


def register(group: click.Group) -> None:
    group.add_command(stage_job)
