"""The plugin manager: built-ins, installed packages, and the project's plugins folder.

Load order: the built-in plugins (``plugins/*.py`` of this distribution,
loaded by path, exactly like a user's folder), then packages declaring an
entry point in group ``remoteops``, then every ``*.py`` in the project's
plugins folder (``plugins_dir``, default ``plugins/``). ``check_pending()``
catches hooks a plugin misspelled.

Environment: ``REMOTEOPS_BLOCK_PLUGINS=a,b`` blocks plugins by name (except the
core ones), ``REMOTEOPS_TRACE_HOOKS=1`` prints every hook call to stderr.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pluggy

from remoteops import hookspecs
from remoteops.common.builtin_plugins import builtin_dir
from remoteops.common.errors import ConfigError, RemoteOpsError

GROUP = "remoteops"
# Built-ins in this tuple, loaded in this order.
BUILTIN_PLUGINS = ("precheck_basics", "executors", "slurm", "gpu_gate", "base_model",
                   "post_eval_fix", "quant_bnb", "quant_gguf")
UNBLOCKABLE = frozenset({"precheck_basics", "executors"})  # a run needs the process executor


@dataclass
class PluginInfo:
    name: str
    source: str  # builtin | entrypoint | project | test
    location: str
    version: str
    hooks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "location": self.location,
                "version": self.version, "hooks": self.hooks}


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus where each plugin came from."""

    def __init__(self) -> None:
        super().__init__(GROUP)
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, PluginInfo] = {}

    def register_module(self, module: Any, name: str, source: str, location: str,
                        version: str) -> None:
        if self.is_blocked(name) or self.has_plugin(name):
            return
        self.register(module, name=name)
        self.origins[name] = PluginInfo(name, source, location, version)

    def infos(self) -> list[PluginInfo]:
        out = []
        for name, info in self.origins.items():
            plugin = self.get_plugin(name)
            if plugin is None:
                continue
            hooks = sorted(h.name for h in (self.get_hookcallers(plugin) or []))
            out.append(PluginInfo(info.name, info.source, info.location, info.version, hooks))
        return out

    def requirements(self) -> list[str]:
        """The plugin set as ``name==version`` (recorded in bundle manifests)."""
        return sorted(f"{i.name}=={i.version}" for i in self.infos())


def load_file(path: Path, name: str) -> ModuleType:
    """Import a single-file plugin by path, without putting its folder on sys.path."""
    spec = importlib.util.spec_from_file_location(f"remoteops_plugin_{name}", path)
    if spec is None or spec.loader is None:
        raise RemoteOpsError(f"cannot load plugin file {path}; is it a Python file?")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a user's plugin may raise anything on import
        raise RemoteOpsError(f"plugin {path} failed to import: {type(exc).__name__}: {exc}; "
                             "fix it or move it out of the plugins folder.") from exc
    return module


def _folder_plugins(pm: PluginManager, folder: Path, source: str, only: tuple[str, ...] = ()):
    if not folder.is_dir():
        return
    names = only or tuple(sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_")))
    for name in names:
        path = folder / f"{name}.py"
        if pm.is_blocked(name) or pm.has_plugin(name):
            continue
        module = load_file(path, name)
        version = str(getattr(module, "__version__", "0"))
        pm.register_module(module, name, source, str(path), version)


def get_plugin_manager(project_dir: str | os.PathLike | None = None,
                       plugins_dir: str = "plugins", entrypoints: bool | None = None,
                       ) -> PluginManager:
    """A manager with the built-ins, installed plugins and the project's folder loaded."""
    pm = PluginManager()
    for name in _blocked_names():
        if name not in UNBLOCKABLE:
            pm.set_blocked(name)
    if os.environ.get("REMOTEOPS_TRACE_HOOKS"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()

    from remoteops import __version__

    for name in BUILTIN_PLUGINS:
        if pm.is_blocked(name):
            continue
        path = builtin_dir() / f"{name}.py"
        pm.register_module(load_file(path, name), name, "builtin", str(path), __version__)

    if entrypoints is None:
        entrypoints = not (getattr(sys, "_called_from_test", False)
                           or os.environ.get("REMOTEOPS_NO_ENTRYPOINTS"))
    if entrypoints:
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != GROUP or pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                    continue
                try:
                    module = ep.load()
                except Exception as exc:
                    raise RemoteOpsError(
                        f"installed plugin '{ep.name}' ({dist.metadata['Name']}) failed to "
                        f"import: {type(exc).__name__}: {exc}; upgrade or uninstall it, or "
                        f"block it with REMOTEOPS_BLOCK_PLUGINS={ep.name}.") from exc
                pm.register_module(module, ep.name, "entrypoint",
                                   f"{dist.metadata['Name']} ({ep.value})", dist.version)

    project = Path(project_dir or os.getcwd()).resolve()
    folder = Path(plugins_dir)
    folder = folder if folder.is_absolute() else project / folder
    if folder.resolve() != builtin_dir().resolve():
        _folder_plugins(pm, folder, "project")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise RemoteOpsError(f"{exc}; check the hook names against remoteops.hookspecs.") from None
    return pm


def health_rules(pm: pluggy.PluginManager, settings: Any) -> list[Any]:
    """The rules every ``health_rules`` implementation registers, in hook order."""
    rules: list[Any] = []
    pm.hook.health_rules(register=rules.append, settings=settings)
    return rules


def run_health_rules(rules: list[Any], step: int, loss: float | None = None,
                     grad_norm: float | None = None, lr: float | None = None
                     ) -> tuple[str, str] | None:
    """The first ``(reason, message)`` a rule returns for this step, else None."""
    from remoteops.common.health import run_rules

    return run_rules(rules, step, loss, grad_norm, lr)


def executors(pm: pluggy.PluginManager) -> dict[str, Any]:
    """Every registered executor class by name (``register_executors``; the first wins)."""
    found: dict[str, Any] = {}
    for name, cls in collect(pm, "register_executors"):
        found.setdefault(name, cls)
    return found


def executor_for(pm: pluggy.PluginManager, settings: Any, stage: str) -> Any:
    """The executor that runs ``stage`` (``[stages.X] executor``, default ``process``), its
    options checked; ConfigError (one line) for an unknown name or a bad option."""
    from remoteops.common.config_schema import check_executor

    table = (settings["stages"] or {}).get(stage) or {}
    registered = executors(pm)
    name = check_executor(stage, table, sorted(registered))
    cls = registered[name]
    try:
        cls.check_options(stage, table)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    executor = cls(stage, table)
    executor.settings = settings  # the run's settings: an executor's own table ([slurm])
    return executor


def check_executors(pm: pluggy.PluginManager, settings: Any, stages: list[str]
                    ) -> dict[str, Any]:
    """Each configured stage's executor; ConfigError (one line) for an unknown executor or a
    bad option of any of ``stages``."""
    configured = settings["stages"] or {}
    return {stage: executor_for(pm, settings, stage) for stage in stages if stage in configured}


def _blocked_names() -> list[str]:
    raw = os.environ.get("REMOTEOPS_BLOCK_PLUGINS", "")
    return [n.strip() for n in raw.split(",") if n.strip()]


def each_plugin(pm: pluggy.PluginManager, hook: str) -> Iterator[tuple[str, Any]]:
    """``(plugin name, caller)`` for each plugin implementing ``hook``, in load order.

    The caller is pluggy's own hook caller (``pm.subset_hook_caller``) narrowed to that
    one plugin (wrappers stay), so every call goes through ``pm.hook`` with its checks,
    tracing and wrappers, while the caller can time each plugin and keep one plugin's
    failure from stopping the next.
    """
    caller = getattr(pm.hook, hook)
    impls = caller.get_hookimpls()
    plain = [i for i in impls if not (i.hookwrapper or i.wrapper)]
    tracing = bool(os.environ.get("REMOTEOPS_TRACE_HOOKS"))
    for impl in plain:
        others = [i.plugin for i in plain if i is not impl]
        if tracing:
            sys.stderr.write(f"hook {hook} -> plugin {impl.plugin_name}\n")
        yield impl.plugin_name, pm.subset_hook_caller(hook, remove_plugins=others)


def collect(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> list[Any]:
    """Call a ``register_*`` hook plugin by plugin, in load order; return what was registered.

    ``register(x)`` records ``x``; ``register(name, x)`` records ``(name, x)``.
    """
    items: list[Any] = []

    def register(*args: Any) -> None:
        items.append(args[0] if len(args) == 1 else args)

    for _name, call in each_plugin(pm, hook):
        call(register=register, **kwargs)
    return items
