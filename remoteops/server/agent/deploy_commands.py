"""Agent commands for deploys: plan, apply, rollback, backups, recover.

The laptop runs them over SSH with ``--json``; they print their result as JSON
between markers, so whatever a login shell prints around them is ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from remoteops.common.wire import marked


def emit(data: dict, as_json: bool, human: str) -> None:
    if as_json:
        sys.stdout.write(marked(data))
    else:
        click.echo(human)


root_option = click.option("--root", required=True, help="The project root on this machine.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON between markers.")
holder_option = click.option("--holder", default="remoteops-agent",
                             help="Who holds the lock (shown to anyone who finds it locked).")
keep_option = click.option("--keep", default=10, show_default=True,
                           help="How many backups to keep.")


@click.command("deploy-plan")
@root_option
@click.option("--manifest", required=True, help="The new bundle's manifest file.")
@json_option
def deploy_plan(root: str, manifest: str, as_json: bool) -> None:
    """Compare a bundle manifest with the files under the project root."""
    from remoteops.server.apply import Project
    from remoteops.server.incoming import read_manifest_file

    from remoteops.server.streamapply import stream_parts

    project = Project(root)
    new = read_manifest_file(manifest)
    plan = project.plan(new)
    plan["stream_parts"] = stream_parts(project, new.content_id)  # a cut upload resumes
    emit(plan, as_json, f"send {len(plan['need'])} file(s), delete {len(plan['delete'])}, "
                        f"{plan['unchanged']} unchanged")


@click.command("deploy-apply")
@root_option
@click.option("--manifest", required=True, help="The new bundle's manifest file.")
@click.option("--delta", default=None, help="The uploaded tar.zst of changed files.")
@click.option("--sha256", "delta_sha256", default=None, help="Expected sha256 of --delta.")
@click.option("--expect-base", default=None,
              help="Apply only if this content id is deployed here and the disk matches it; "
                   "otherwise answer base_differs and change nothing.")
@click.option("--expect-agent", default=None,
              help="With --expect-base: the agent version the bundle carries.")
@holder_option
@keep_option
@json_option
def deploy_apply(root: str, manifest: str, delta: str | None, delta_sha256: str | None,
                 expect_base: str | None, expect_agent: str | None, holder: str, keep: int,
                 as_json: bool) -> None:
    """Apply a bundle in place: lock, back up, journal, replace, record."""
    from remoteops.server.apply import Project
    from remoteops.server.incoming import read_manifest_file, wait_for_delta

    new = read_manifest_file(manifest)
    if delta:
        wait_for_delta(Path(delta))  # the laptop may still be sending it
    result = Project(root).apply(new, Path(delta).expanduser() if delta else None, holder, keep,
                                 delta_sha256, expect_base=expect_base,
                                 expect_agent=expect_agent)
    if result.get("base_differs"):
        # the laptop plans against this server next, with the manifest left here
        if delta:
            Path(delta).expanduser().unlink(missing_ok=True)
        emit(result, as_json, f"not applied: {result['reason']}")
        return
    if delta and not result.get("noop"):
        Path(delta).expanduser().unlink(missing_ok=True)
    Path(manifest).expanduser().unlink(missing_ok=True)
    emit(result, as_json, f"applied v{result['version']}; backup: {result.get('backup')}")


@click.command("deploy-stream")
@root_option
@json_option
def deploy_stream(root: str, as_json: bool) -> None:
    """Apply a deploy sent on stdin: manifest delta, changed files, go (one request)."""
    from remoteops.server.streamapply import apply_streamed

    def say(data: dict) -> None:  # an answer while the request goes on (the plan)
        emit(data, True, "")
        sys.stdout.flush()

    result = apply_streamed(root, sys.stdin.buffer, say)
    if result.get("base_differs"):
        emit(result, as_json, f"not applied: {result['reason']}")
        return
    emit(result, as_json, "up to date" if result.get("noop") else
         f"applied v{result['version']}; backup: {result.get('backup')}")


@click.command("rollback")
@root_option
@click.option("--backup", "backup", required=True, help="Backup folder name (or path).")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@holder_option
@keep_option
@json_option
def rollback(root: str, backup: str, dry_run: bool, holder: str, keep: int,
             as_json: bool) -> None:
    """Restore exactly the state a backup recorded (itself backed up)."""
    from remoteops.server.apply import Project

    project = Project(root)
    if dry_run:
        plan = project.rollback_plan(backup)
        emit(plan, as_json, f"would restore {len(plan['restore'])} and remove "
                            f"{len(plan['remove'])} file(s)")
        return
    result = project.rollback(backup, holder, keep)
    emit(result, as_json, f"rolled back to v{result['version']}; backup: {result['backup']}")


@click.command("backups")
@root_option
@json_option
def backups(root: str, as_json: bool) -> None:
    """List the backups under the project root."""
    from remoteops.server.apply import Project

    rows = Project(root).list_backups()
    emit({"backups": rows}, as_json, "\n".join(
        f"{'*' if r['current'] else ' '} {r['name']}  {r['kind']}  v{r['version']}  "
        f"{r['files']} files  {r['size']} bytes" for r in rows) or "no backups")


@click.command("recover")
@root_option
@holder_option
@json_option
def recover(root: str, holder: str, as_json: bool) -> None:
    """Undo an interrupted apply or rollback (normally done by the next command)."""
    from remoteops.server.apply import Project

    project = Project(root)
    with project.lock(holder):
        result = project.recover()
    emit({"recovered": result}, as_json, f"recovered: {result}" if result else "nothing to do")


@click.command("resident")
@json_option
def resident(as_json: bool) -> None:
    """Serve the laptop's kept connection: run agent requests sent as frames on stdin, each in
    a forked child (started by the laptop; not for typing)."""
    from remoteops.server.resident import main as serve

    sys.exit(serve([]))


def register(group: click.Group) -> None:
    for command in (deploy_plan, deploy_apply, deploy_stream, resident, rollback, backups,
                    recover):
        group.add_command(command)
