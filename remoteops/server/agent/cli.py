"""``remoteops-agent``: the server-side command line.

The laptop starts these commands over SSH (or locally) and reads the files
they write. Commands that need torch import it lazily, so ``--help`` and
``version`` stay fast on any Python.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import traceback

import click

from remoteops import __version__
from remoteops.common.errors import RemoteOpsError


class AgentGroup(click.Group):
    """Prints a ``RemoteOpsError`` as one line (``REMOTEOPS_DEBUG=1`` shows the traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RemoteOpsError as exc:
            if os.environ.get("REMOTEOPS_DEBUG"):
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=AgentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="remoteops-agent")
def main() -> None:
    """remoteops server-side agent: runs on the training server (or locally)."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def version(as_json: bool) -> None:
    """Print the agent's version and the Python it runs on."""
    info = {"version": __version__, "python": platform.python_version(),
            "executable": sys.executable}
    click.echo(json.dumps(info) if as_json else f"remoteops-agent {__version__} "
               f"(Python {info['python']}, {info['executable']})")


@main.command()
@click.option("--project-dir", default=".", show_default=True, help="Project folder.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(project_dir: str, as_json: bool) -> None:
    """List loaded plugins, where they came from, and their hooks."""
    from remoteops.common.config import load_settings
    from remoteops.plugins import get_plugin_manager
    from remoteops.tables import print_plugins

    settings = load_settings(project_dir)
    pm = get_plugin_manager(settings.project_dir, settings["plugins_dir"])
    print_plugins(pm.infos(), as_json)


def _register_optional_commands() -> None:
    """Commands from sibling modules (trainer, pipeline...), added when present."""
    import importlib

    for module_name in ("remoteops.server.agent.deploy_commands", "remoteops.server.agent.train_commands",
                        "remoteops.server.agent.pipeline_commands", "remoteops.server.agent.quant_commands",
                        "remoteops.server.agent.serve_commands", "remoteops.server.agent.model_commands",
                        "remoteops.server.agent.data_commands",
                        "remoteops.server.agent.slurm_commands"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(main)


_register_optional_commands()
