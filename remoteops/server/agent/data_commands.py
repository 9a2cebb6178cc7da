"""Agent commands for a live dataset: data-status, data-receive, data-done (the laptop's
``sync-data``). The work is ``server/data_receive``; the format ``common/live_data``."""

from __future__ import annotations

import click

from remoteops.server.agent.deploy_commands import emit, json_option, root_option

dest_option = click.option("--dest", required=True,
                           help="The live dataset's folder, relative to the root (data/live).")


@click.command("data-status")
@root_option
@dest_option
@click.option("--ids", is_flag=True, help="Also list every sample's id and sha256.")
@json_option
def data_status(root, dest, ids, as_json):
    """Show how many verified samples the live dataset holds, and whether it is complete."""
    from remoteops.server.data_receive import status

    out = status(root, dest, ids)
    done = " (complete)" if out["complete"] else ""
    emit(out, as_json, f"{out['samples']} sample(s) in {out['dest']}{done}")


@click.command("data-receive")
@root_option
@dest_option
@click.option("--tar", "tar_path", required=True, help="The uploaded batch (a tar, gzip or plain).")
@click.option("--sha256", required=True, help="The batch's expected sha256.")
@json_option
def data_receive(root, dest, tar_path, sha256, as_json):
    """Verify an uploaded batch of samples and commit it to the live dataset."""
    from remoteops.server.data_receive import receive_batch

    out = receive_batch(root, dest, tar_path, sha256)
    emit(out, as_json, f"added {len(out['added'])}, skipped {len(out['skipped'])} already "
                       f"there; {out['samples']} sample(s) now")


@click.command("data-done")
@root_option
@dest_option
@click.option("--expect", type=int, default=None,
              help="Refuse unless the dataset holds exactly this many samples.")
@json_option
def data_done(root, dest, expect, as_json):
    """Mark the live dataset complete (no more samples will come)."""
    from remoteops.server.data_receive import mark_complete

    out = mark_complete(root, dest, expect)
    emit(out, as_json, f"{out['dest']}: complete with {out['samples']} sample(s)")


def register(group: click.Group) -> None:
    for command in (data_status, data_receive, data_done):
        group.add_command(command)
