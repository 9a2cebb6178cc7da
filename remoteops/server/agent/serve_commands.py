"""Agent commands of ``invoke serve`` and ``invoke chat``: start a chat server detached, run
it, report on it, stop it; the stage's eval prompts; a chat comparison into the run's report.

The laptop calls each with ``--json`` in one SSH command (``serve-run`` is what
``serve-start`` spawns). See ``remoteops.server.serving``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from remoteops.common.errors import RemoteOpsError
from remoteops.common.serving import DEFAULT_PORT, FORMATS_HELP
from remoteops.server.agent.deploy_commands import emit, json_option, root_option


def _root(root: str) -> Path:
    return Path(os.path.expanduser(root)).resolve()


port_option = click.option("--port", type=int, default=DEFAULT_PORT, show_default=True,
                           help="The port on 127.0.0.1 of this machine.")


def _human(entry: dict) -> str:
    from remoteops.common.serving import describe

    return (f"port {entry['port']}: {describe(entry)} {entry['status']} (pid {entry.get('pid')}, "
            f"since {entry.get('started')}) {entry.get('model')}")


@click.command("serve-start")
@root_option
@click.option("--stage", default=None, help="The stage to serve (default: the last one that "
              "finished in the latest run).")
@click.option("--format", "fmt", default="adapter", show_default=True, help=FORMATS_HELP)
@click.option("--run", "run_id", default=None, help="The run (default: the latest in which "
              "the stage finished).")
@port_option
@click.option("--wait", "wait_s", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the server to answer before returning 'starting'.")
@json_option
def serve_start(root, stage, fmt, run_id, port, wait_s, as_json):
    """Start an OpenAI-compatible chat server for a stage, detached (127.0.0.1 only)."""
    from remoteops.common.config import load_settings
    from remoteops.common.serving import check_port
    from remoteops.server import serving
    from remoteops.server.pipeline import agent_args, spawn_detached

    project = _root(root)
    port = check_port(port)
    spec = serving.resolve(project, load_settings(project), stage, fmt, run_id)

    def spawn(port, fd, log):
        return spawn_detached(agent_args("serve-run", "--root", str(project), "--port",
                                         str(port), "--lock-fd", str(fd)), log, project,
                              pass_fds=(fd,))

    entry = serving.start(project, spec, port, spawn, wait_s)
    if entry["status"] == "dead":
        tail = [line for line in entry.get("log_tail", []) if line.strip()][-1:]
        serving.stop(project, port, 1.0)
        raise RemoteOpsError(f"the chat server for {spec['stage']} failed to start: "
                                   f"{tail[0] if tail else 'no output'}")
    emit(entry, as_json, _human(entry))


@click.command("serve-run")
@root_option
@port_option
@click.option("--lock-fd", type=int, default=None, help="The port's lock, already held.")
def serve_run(root, port, lock_fd):
    """Serve in the foreground what the port's state file names (serve-start uses this)."""
    from remoteops.common.serving import state_path
    from remoteops.server.serving import HOST

    spec = json.loads(state_path(_root(root), port).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    click.echo(f"serving {spec['format']} of stage {spec['stage']} on {HOST}:{port}: "
               f"{spec['model']}", err=True)
    if spec["format"] == "adapter":
        from remoteops.trainer.serve_adapter import serve

        serve(Path(spec["base_model"]), Path(spec["model"]), spec["stage"], HOST, port)
    else:
        from remoteops.quant.serve_gguf import serve

        serve(Path(spec["model"]), spec["stage"], HOST, port)


@click.command("serve-status")
@root_option
@json_option
def serve_status(root, as_json):
    """What this project serves: port, stage, format, model, pid, and whether it answers."""
    from remoteops.server.serving import listing

    servers = listing(_root(root))
    emit({"servers": servers}, as_json,
         "\n".join(_human(s) for s in servers) or "nothing is served")


@click.command("serve-stop")
@root_option
@click.option("--port", type=int, default=None, help="The port to stop (default: every "
              "server of this project).")
@json_option
def serve_stop(root, port, as_json):
    """Stop a chat server and its whole process tree (SIGTERM, then SIGKILL)."""
    from remoteops.common.config import load_settings
    from remoteops.common.runs import stop_grace
    from remoteops.server.serving import stop

    project = _root(root)
    result = stop(project, port, min(stop_grace(load_settings(project)), 10.0))
    if result["left"]:
        raise RemoteOpsError(f"could not stop every process: {result['left']}")
    emit(result, as_json, "\n".join(f"stopped port {s['port']} ({s['what']})"
                                    for s in result["stopped"]) or "nothing was served")


@click.command("serve-prompts")
@root_option
@click.option("--stage", required=True, help="The stage whose eval prompts to list.")
@click.option("--limit", type=int, default=5, show_default=True, help="At most this many.")
@json_option
def serve_prompts(root, stage, limit, as_json):
    """The stage's eval-set prompts (chat messages), for 'invoke chat --compare base'."""
    from remoteops.common.config import load_settings
    from remoteops.trainer.data import read_jsonl
    from remoteops.trainer.stageconf import resolve_stage

    project = _root(root)
    cfg = resolve_stage(load_settings(project), stage)
    if cfg.eval_set is None:
        raise RemoteOpsError(f"stage {stage} has no eval_set; give prompts on the "
                                   "command line instead.")
    data = read_jsonl(cfg.eval_set, 10**6, kind="eval", base=project)
    prompts = [{"messages": r.messages, "reference": r.extra.get("reference")}
               for r in data.records[:max(0, limit)]]
    emit({"stage": stage, "eval_set": data.path, "prompts": prompts}, as_json,
         "\n".join(p["messages"][-1]["content"] for p in prompts))


@click.command("serve-report")
@root_option
@click.option("--run", "run_id", required=True, help="The run whose report gets the table.")
@click.option("--file", "path", required=True,
              help="A chat_compare_<stage>.json already written into the run directory.")
@json_option
def serve_report(root, run_id, path, as_json):
    """Rewrite the run's TRAINING_SUMMARY.md so it shows a chat comparison table."""
    from remoteops.common.runs import find_run
    from remoteops.server.reports import write_training_summary

    run_dir = find_run(_root(root), run_id)
    name = Path(path).name
    if not (name.startswith("chat_compare_") and (run_dir / name).is_file()):
        raise RemoteOpsError(f"no {name} in {run_dir}")
    summary = write_training_summary(run_dir)
    emit({"summary": str(summary), "file": str(run_dir / name)}, as_json, str(summary))


def register(group: click.Group) -> None:
    for command in (serve_start, serve_run, serve_status, serve_stop, serve_prompts,
                    serve_report):
        group.add_command(command)
