"""Agent commands for the base model: fetch-model (download on the server) and model-receive
(the laptop's copy arriving). The work is ``server/model_fetch`` and ``server/model_receive``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from remoteops.common.sizes import human_size
from remoteops.server.agent.deploy_commands import emit, json_option, root_option


def _root(root: str) -> Path:
    return Path(os.path.expanduser(root)).resolve()


def _configured(root: Path) -> str:
    from remoteops.common.config import load_settings

    return str(load_settings(root)["train.base_model"])


@click.command("fetch-model")
@root_option
@click.option("--ref", default=None, help="The model: a Hugging Face id (org/name), "
              "hf:org/name[@rev] or modelscope:org/name (default: the project's "
              "train.base_model).")
@click.option("--wait", is_flag=True, help="Download here in the foreground, printing progress.")
@click.option("--status", "show_status", is_flag=True, help="Show the last download's state.")
@click.option("--host-label", default="<this server>", help="How the laptop names this server "
              "(in messages).")
@click.option("--worker", default=None, hidden=True)
@json_option
def fetch_model(root, ref, wait, show_status, host_label, worker, as_json):
    """Download the base model into this server's cache (resumable, verified).

    Without --wait it starts detached and returns at once; --status shows its progress
    (the laptop's 'invoke fetch-model' follows it)."""
    from remoteops.server import model_fetch

    project = _root(root)
    if show_status:
        state = model_fetch.read_state(project) or {"status": "none", "message": "no download yet"}
        emit(state, as_json, f"{state['status']}: {state.get('message', '')}")
        return
    text = ref or _configured(project)
    if worker:
        state = model_fetch.work(project, text, worker, host_label)
        raise SystemExit(0 if state["status"] == "done" else 1)
    if wait:
        def progress(done, total):
            now = time.monotonic()
            if now - getattr(progress, "last", 0.0) >= 5:
                progress.last = now
                click.echo(f"{human_size(done)}" + (f" of {human_size(total)}" if total else ""))

        result = model_fetch.download(model_fetch.resolve(text, project), click.echo, progress,
                                      host=host_label)
        emit(result, as_json, f"{result['ref']}: {result['files']} files, "
             f"{human_size(result['bytes'])} in {result['path']} (verified)")
        return
    state = model_fetch.start(project, text, host_label)
    emit(state, as_json, f"{state['status']}: {state.get('message', '')}")


@click.command("model-receive")
@root_option
@click.option("--manifest", required=True, help="The laptop's manifest of its copy (JSON).")
@click.option("--commit", is_flag=True, help="Verify the uploaded files and move them into place "
              "(default: plan, i.e. say which files are needed).")
@json_option
def model_receive(root, manifest, commit, as_json):
    """Receive the laptop's copy of the base model: plan what is missing, then commit it."""
    from remoteops.server import model_receive

    project = _root(root)
    if commit:
        out = model_receive.receive_commit(project, manifest)
        emit(out, as_json, f"placed {len(out['placed'])} file(s) in {out['dest']}")
    else:
        out = model_receive.receive_plan(project, manifest)
        emit(out, as_json, f"{len(out['need'])} file(s) needed in {out['dest']}")


def register(group: click.Group) -> None:
    group.add_command(fetch_model)
    group.add_command(model_receive)
