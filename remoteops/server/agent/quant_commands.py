"""Agent commands of the post-eval and quantization plugins: post-eval, quant, closure-report.

Each runs on an existing run directory (default: the newest one with the
stage's eval report) and writes its results there; torch is imported only
when a quantization check runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from remoteops.common.errors import ConfigError


def _settings(config: str | None):
    from remoteops.common.config import load_settings

    if config:
        path = Path(config).expanduser().resolve()
        if not path.is_file() or path.name != "remoteops.toml":
            raise ConfigError(f"--config {config}: pass the project's remoteops.toml.")
        return load_settings(path.parent)
    return load_settings(None)


def _run_dir(settings, stage: str | None, run_dir: str | None) -> Path:
    from remoteops.common.rundir import run_dirs

    if run_dir:
        path = Path(run_dir).expanduser()
        path = path if path.is_absolute() else Path.cwd() / path
        if not path.is_dir():
            raise ConfigError(f"run directory {run_dir} does not exist.")
        return path.resolve()
    runs = run_dirs(settings.project_dir)
    if stage:
        runs = [r for r in runs if (r / f"eval_report_{stage}.json").is_file()
                or (r / "summary.json").is_file()]
    if not runs:
        what = f"with an eval report of stage '{stage}' " if stage else ""
        raise ConfigError(f"no run directory {what}under {settings.project_dir / 'outputs/training_sync'}"
                          f"; run 'remoteops-agent eval --stage {stage or 'NAME'}' first or pass "
                          "--run-dir.")
    return runs[-1]


def register(group: click.Group) -> None:
    """Add post-eval, quant and closure-report to the agent CLI."""

    @group.command("post-eval")
    @click.option("--stage", required=True, help="Stage name.")
    @click.option("--run-dir", default=None, help="Run directory (default: the newest with the "
                  "stage's eval report).")
    @click.option("--config", default=None, help="remoteops.toml (default: ./remoteops.toml).")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    def post_eval_cmd(stage, run_dir, config, as_json):
        """Apply the post-eval fix plugins to a stage's answers and re-score them."""
        from remoteops.server.postprocess import run_post_eval

        settings = _settings(config)
        path = _run_dir(settings, stage, run_dir)
        if not (path / f"eval_report_{stage}.json").is_file():
            raise ConfigError(f"no eval_report_{stage}.json in {path}; run 'remoteops-agent eval "
                              f"--stage {stage}' first.")
        log = (lambda m: None) if as_json else click.echo
        result = run_post_eval(settings, stage, path, explicit=True, log=log)
        if not result:
            raise ConfigError("no post-eval plugin is loaded; see 'remoteops-agent plugins'.")
        if as_json:
            click.echo(json.dumps(result, default=str, ensure_ascii=False))
        if any(r.get("status") == "failed" for r in result.values()):
            raise SystemExit(1)

    @group.command("quant")
    @click.option("--stage", required=True, help="Stage name.")
    @click.option("--only", type=click.Choice(["gguf", "bnb"]), default=None,
                  help="Run one check (default: every loaded check).")
    @click.option("--run-dir", default=None, help="Run directory (default: the newest of the stage).")
    @click.option("--adapter", default=None,
                  help="Adapter folder (default: outputs/adapter/adapter_<stage>).")
    @click.option("--config", default=None, help="remoteops.toml (default: ./remoteops.toml).")
    @click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
    def quant_cmd(stage, only, run_dir, adapter, config, as_json):
        """Check whether a stage's adapter can be served quantized (bitsandbytes, GGUF)."""
        from remoteops.server.postprocess import run_quant_checks

        settings = _settings(config)
        try:
            path = _run_dir(settings, stage, run_dir)
        except ConfigError:
            if run_dir:
                raise
            from remoteops.common.rundir import new_run_dir

            path = new_run_dir(settings.project_dir)
            path.mkdir(parents=True)
        log = (lambda m: None) if as_json else click.echo
        results = run_quant_checks(settings, stage, path, only=only, explicit=True, log=log,
                                   adapter=Path(adapter).resolve() if adapter else None)
        if as_json:
            click.echo(json.dumps(results, default=str, ensure_ascii=False))
            return
        for name, res in results.items():
            click.echo(f"{name}: {res.get('verdict')} - {res.get('reason')}")
            for row in res.get("rows") or []:
                delta = row.get("ppl_delta")
                click.echo(f"  {row.get('type'):<8} {row.get('verdict'):<20} "
                           f"ppl delta {'n/a' if delta is None else f'{delta:+.2%}'}  "
                           f"tokens/s {row.get('tokens_per_s', 'n/a')}")
        click.echo(f"results in {path / f'quant_{stage}.json'}")

    @group.command("closure-report")
    @click.option("--run-dir", default=None, help="Run directory (default: the newest).")
    @click.option("--config", default=None, help="remoteops.toml (default: ./remoteops.toml).")
    def closure_report_cmd(run_dir, config):
        """Write final_closure_report.md and .json into the run directory."""
        from remoteops.server.postprocess import write_closure_report

        settings = _settings(config)
        path = write_closure_report(_run_dir(settings, None, run_dir), settings)
        click.echo(f"closure report written to {path}")
