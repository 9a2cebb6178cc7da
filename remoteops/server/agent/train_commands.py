"""Agent commands of the built-in trainer: train, make-demo-model, checkpoints, eval.

torch and transformers are imported inside the commands, so ``--help`` stays fast.
Exit codes: 0 done, 1 training failed (reason in ``<stage>.failed``), 2 a
config/data error the user can fix (printed as one line).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from remoteops.common.errors import ConfigError


def _load(config: str | None, stage: str, preset: str | None = None,
          overrides: str | None = None, run_dir: str | None = None):
    """The settings and the stage's resolved config. In a pipeline run (``--run-dir`` holds
    the run's settings) those settings, else the project's files."""
    from remoteops.common.config import load_settings
    from remoteops.common.runs import SETTINGS_FILE, run_settings
    from remoteops.trainer.stageconf import read_overrides, resolve_stage

    if not config and run_dir and (Path(run_dir) / SETTINGS_FILE).is_file():
        settings = run_settings(Path(run_dir))
        return settings, resolve_stage(settings, stage, preset, read_overrides(overrides))
    if config:
        path = Path(config).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"config file {config} not found; pass the project's remoteops.toml.")
        if path.name != "remoteops.toml":
            raise ConfigError(f"--config must point at a file named remoteops.toml (got {config}); "
                              "the folder holding it is the project folder.")
        project = path.parent
    else:
        project = None
    settings = load_settings(project)
    return settings, resolve_stage(settings, stage, preset, read_overrides(overrides))


def _resolve_run_dir(project: Path, run_dir: str | None) -> Path | None:
    if not run_dir:
        return None
    path = Path(run_dir).expanduser()
    return (path if path.is_absolute() else Path.cwd() / path).resolve()


def _latest_run_dir(project: Path, stage: str) -> Path:
    from remoteops.common.rundir import run_dirs

    runs = [r for r in run_dirs(project) if (r / "checkpoints" / stage).is_dir()
            or (r / f"{stage}.done").exists() or (r / "summary.json").exists()]
    if not runs:
        raise ConfigError(f"no run of stage '{stage}' under {project / 'outputs/training_sync'}; "
                          "train it first or pass --run-dir.")
    return runs[-1]


def register(group: click.Group) -> None:
    """Add the trainer's commands to the agent CLI."""

    @group.command()
    @click.option("--stage", required=True, help="Stage name ([stages.NAME] in remoteops.toml).")
    @click.option("--config", "config", default=None, help="remoteops.toml (default: ./remoteops.toml).")
    @click.option("--preset", type=click.Choice(["quick", "standard", "extended"]), default=None,
                  help="Training preset (default: the stage's, else train.preset).")
    @click.option("--resume", "resume", is_flag=False, flag_value="latest", default=None,
                  help="Resume from the newest checkpoint ('latest', the default) or a PATH.")
    @click.option("--dry-run", is_flag=True, help="Validate config, data and model; do not train.")
    @click.option("--run-dir", default=None,
                  help="Run directory (default: outputs/training_sync/run_<UTC stamp>).")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON at the end.")
    @click.option("--overrides", default=None,
                  help="A JSON file {\"train\": {key: value}} of typed train settings that win "
                       "over the config (the pipeline's OOM retry uses it).")
    def train(stage, config, preset, resume, dry_run, run_dir, as_json, overrides):
        """Train one stage with LoRA/QLoRA (exit 1 when the health watch stops it)."""
        from remoteops.trainer.checkpoints import find_resume
        from remoteops.common.rundir import new_run_dir

        settings, cfg = _load(config, stage, preset, overrides, run_dir)
        if dry_run:
            from remoteops.trainer.train import dry_run as do_dry_run

            info = do_dry_run(cfg)
            if as_json:
                click.echo(json.dumps(info))
            return
        path = _resolve_run_dir(cfg.project_dir, run_dir)
        ckpt = None
        if resume:
            path, ckpt = find_resume(cfg.project_dir, stage, resume, path)
        path = path or new_run_dir(cfg.project_dir)
        from remoteops.plugins import get_plugin_manager, health_rules
        from remoteops.server.model_fetch import ensure_base_model
        from remoteops.trainer.train import run_train

        ensure_base_model(cfg.train["base_model"], cfg.project_dir)  # a hub id not cached yet

        rules = health_rules(get_plugin_manager(cfg.project_dir, settings["plugins_dir"]), settings)
        entry = run_train(cfg, path, ckpt, rules=rules)
        if as_json:
            click.echo(json.dumps(entry, default=str))
        if entry["status"] != "done":
            sys.exit(1)

    @group.command("make-demo-model")
    @click.option("--out", default="outputs/demo-model", show_default=True,
                  help="Folder for the model (a Hugging Face model directory).")
    @click.option("--seed", default=0, show_default=True, help="Random seed of the weights.")
    @click.option("--project", is_flag=True,
                  help="Also copy the demo project (remoteops.toml, data/) into the current folder.")
    def make_demo_model(out, seed, project):
        """Build the tiny demo model (Qwen3 architecture, random weights) offline."""
        from remoteops.trainer.demo_model import build_demo_model, copy_demo_project

        if project:
            copy_demo_project(Path.cwd())
            click.echo(f"demo project copied to {Path.cwd()}")
        path = build_demo_model(Path(out), seed=seed)
        click.echo(f"demo model written to {path}")

    @group.command()
    @click.option("--stage", required=True, help="Stage name.")
    @click.option("--config", "config", default=None, help="remoteops.toml (default: ./remoteops.toml).")
    @click.option("--run-dir", default=None, help="Run directory (default: the newest with this stage).")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def checkpoints(stage, config, run_dir, as_json):
        """List a stage's checkpoints with sizes, best and latest."""
        from remoteops.common.sizes import human_size
        from remoteops.trainer.checkpoints import list_checkpoints

        _, cfg = _load(config, stage)
        path = _resolve_run_dir(cfg.project_dir, run_dir) or _latest_run_dir(cfg.project_dir, stage)
        items = list_checkpoints(path / "checkpoints" / stage)
        if as_json:
            click.echo(json.dumps({"run_dir": str(path), "stage": stage, "checkpoints": items}))
            return
        if not items:
            click.echo(f"no checkpoints of stage '{stage}' in {path}")
            return
        click.echo(f"checkpoints of stage '{stage}' in {path}:")
        for c in items:
            tags = [t for t in ("best", "latest") if c[t]] + ([] if c["complete"] else ["incomplete"])
            loss = f"eval_loss {c['eval_loss']:.4f}" if c["eval_loss"] is not None else ""
            epoch = f"epoch {c['epoch']:g}" if c["epoch"] is not None else ""
            click.echo(f"  {c['name']:<18} step {c['step']:<6} {epoch:<10} {loss:<18} "
                       f"{human_size(c['size'], 'binary'):>9}  {' '.join(tags)}")

    @group.command("eval")
    @click.option("--stage", required=True, help="Stage name.")
    @click.option("--config", "config", default=None, help="remoteops.toml (default: ./remoteops.toml).")
    @click.option("--run-dir", default=None, help="Where eval_report_<stage>.json goes "
                  "(default: the newest run of this stage).")
    @click.option("--adapter", default=None, help="Adapter folder (default: outputs/adapter/adapter_<stage>).")
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    def eval_cmd(stage, config, run_dir, adapter, as_json):
        """Evaluate a stage's adapter against its eval set and targets."""
        from remoteops.trainer.evaluate import run_eval
        from remoteops.common.rundir import new_run_dir

        _, cfg = _load(config, stage, run_dir=run_dir)
        path = _resolve_run_dir(cfg.project_dir, run_dir)
        if path is None:
            try:
                path = _latest_run_dir(cfg.project_dir, stage)
            except ConfigError:
                path = new_run_dir(cfg.project_dir)
        report = run_eval(cfg, path, Path(adapter).resolve() if adapter else None)
        if as_json:
            click.echo(json.dumps(report, default=str))
