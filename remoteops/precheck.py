"""``precheck``: is the server ready? Every check's probe runs in one round trip.

The probes run under the server's plain Python (remoteops need not be
installed there); their answers are judged on the laptop by each check's
``evaluate``. Checks come from plugins (``register_checks``); the GPU gate is
one of them.
"""

from __future__ import annotations

from typing import Any

from remoteops.checks import FAIL, Check, CheckResult
from remoteops.common.config import Settings
from remoteops.plugins import collect, get_plugin_manager
from remoteops.common.target import Target

# Runs on the server: every probe in its own namespace, each failure contained.
PROBE_RUNNER = r'''
import time, traceback
ctx = payload["ctx"]
result = {}
for name, source in payload["probes"]:
    started = time.time()
    try:
        ns = {"__name__": "remoteops_probe_" + name}
        exec(compile(source, "<probe %s>" % name, "exec"), ns)
        result[name] = {"value": ns["probe"](ctx)}
    except BaseException as exc:
        result[name] = {"error": "%s: %s" % (type(exc).__name__, exc),
                        "trace": traceback.format_exc()[-2000:]}
    result[name]["seconds"] = round(time.time() - started, 3)
'''


def configured_datasets(settings: Settings) -> list[str]:
    """Dataset files named in settings: ``datasets`` plus each stage's dataset and eval set."""
    paths: list[str] = list(settings["datasets"])
    for stage in settings["stages"].values():
        if isinstance(stage, dict):
            paths += [str(stage[k]) for k in ("dataset", "eval_set") if stage.get(k)]
    return list(dict.fromkeys(paths))


def load_checks(settings: Settings, pm: Any = None) -> list[Check]:
    pm = pm or get_plugin_manager(settings.project_dir, settings["plugins_dir"])
    checks = collect(pm, "register_checks", settings=settings)
    names = [c.name for c in checks]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        from remoteops.common.errors import RemoteOpsError

        raise RemoteOpsError(f"two plugins register a check named {sorted(dupes)[0]!r}; block "
                             "one with REMOTEOPS_BLOCK_PLUGINS or rename its check.")
    return checks


def run_precheck(settings: Settings, target: Target, pm: Any = None) -> list[CheckResult]:
    """Probe ``target`` once and judge every registered check."""
    checks = load_checks(settings, pm)
    ctx = {"project_root": target.project_root, "datasets": configured_datasets(settings),
           "settings": _jsonable(settings.values), "target_kind": target.kind,
           "target": target.describe()}
    probes = [[c.name, c.probe] for c in checks if c.probe]
    answers = target.run_python(PROBE_RUNNER, {"ctx": ctx, "probes": probes}) if probes else {}
    results: list[CheckResult] = []
    for check in checks:
        answer = answers.get(check.name, {}) if check.probe else {}
        if "error" in answer:
            results.append(CheckResult(check.name, FAIL, f"probe failed: {answer['error']}",
                                       "fix the probe of the plugin that registers this check"))
            continue
        try:
            verdict = check.evaluate(answer.get("value"), settings)
        except Exception as exc:  # a plugin's evaluate may raise anything
            verdict = CheckResult(check.name, FAIL, f"check raised {type(exc).__name__}: {exc}",
                                  "report this to the plugin's author")
        results.extend(verdict if isinstance(verdict, list) else [verdict])
    return results


def _jsonable(values: Any) -> Any:
    """Settings without secret references (probes never see secrets)."""
    if isinstance(values, dict):
        return {k: _jsonable(v) for k, v in values.items()
                if not (isinstance(v, dict) and set(v) == {"$env"})}
    return values
