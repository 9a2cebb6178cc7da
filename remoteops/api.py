"""The plugin API: every name a plugin may import from remoteops, in one place.

Plugins (the built-ins in ``plugins/`` too) import from here, or the three names
``remoteops`` itself exports, and from nowhere else in the package; the rest may
change between versions. ``tests/test_plugin_api.py`` holds the built-ins to this.

Importing this module is cheap and never loads torch: each name is imported
from its home when it is first used. The names from the trainer and quant
(marked *heavy*) load torch, transformers or llama.cpp on first use, so use them
inside a hook, not at a plugin module's top.

Hooks and checks
    ``hookimpl``: the marker for hook implementations (``remoteops.hookspecs`` lists
    every hook). ``Check``, ``CheckResult``: a precheck check and its result.
Stage executors
    ``Executor``: the base class of a way to run a stage (``register_executors``);
    ``Launch``: the process a stage runs, as an executor receives it; ``CannotRun``: what an
    executor raises (one line) for a stage it cannot run. ``run_slurm_job``: a stage attempt
    submitted as a Slurm batch job and followed to its end (the ``slurm`` executor's ``run``;
    server side, imported on first use); ``run_slurm_chain``: consecutive stages submitted at
    once as a chain of jobs (its ``run_chain``).
Health
    ``run_health_rules(rules, step, loss=..., grad_norm=..., lr=...)``: the first
    ``(reason, message)`` the given rules return.
Quantization verdicts
    ``FEASIBLE``, ``WITH_LOSS``, ``NOT_FEASIBLE``, ``SKIPPED``, ``row_verdict``,
    ``overall_verdict``, ``skipped``, ``missing_modules``; ``QuantJob`` is what a
    quantization check's ``run(job)`` receives.
Evaluation (heavy only through its callers)
    ``score_items(items, answers)``, ``compare_targets(scores, targets)``.
Measuring a model (heavy)
    ``hf_perplexity``, ``hf_generate_speed``; GGUF: ``GgufError``, ``CONVERTER_TYPES``,
    ``find_converter``, ``convert``, ``quantize``, ``measure``.
The base model
    ``model_ref``: the module that parses ``train.base_model`` (a folder, a Hugging Face or
    ModelScope id) and judges whether a model folder is complete (standard library only).
Sizes
    ``human_size(n)``: bytes as people read them.
Report sections
    ``post_eval_section(run_dir)``, ``quant_section(run_dir, check)``: markdown tables
    for a ``report_sections`` hook.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "hookimpl": "remoteops.hookspecs",
    "Check": "remoteops.checks",
    "CheckResult": "remoteops.checks",
    "run_health_rules": "remoteops.plugins",
    "Executor": "remoteops.executors",
    "Launch": "remoteops.executors",
    "CannotRun": "remoteops.executors",
    "run_slurm_job": "remoteops.server.slurm_stage",
    "run_slurm_chain": "remoteops.server.slurm_chain",
    "FEASIBLE": "remoteops.quant",
    "WITH_LOSS": "remoteops.quant",
    "NOT_FEASIBLE": "remoteops.quant",
    "SKIPPED": "remoteops.quant",
    "row_verdict": "remoteops.quant",
    "overall_verdict": "remoteops.quant",
    "skipped": "remoteops.quant",
    "missing_modules": "remoteops.quant",
    "QuantJob": "remoteops.quant",
    "score_items": "remoteops.trainer.evaluate",
    "compare_targets": "remoteops.trainer.evaluate",
    "hf_perplexity": "remoteops.quant.job",
    "hf_generate_speed": "remoteops.quant.job",
    "GgufError": "remoteops.quant.gguf_tools",
    "CONVERTER_TYPES": "remoteops.quant.gguf_tools",
    "find_converter": "remoteops.quant.gguf_tools",
    "convert": "remoteops.quant.gguf_tools",
    "quantize": "remoteops.quant.gguf_tools",
    "measure": "remoteops.quant.gguf_tools",
    "post_eval_section": "remoteops.quant.closure",
    "quant_section": "remoteops.quant.closure",
    "human_size": "remoteops.common.sizes",
}
# Whole modules of the API (imported as they are).
_MODULES = {"model_ref": "remoteops.common.model_ref"}

__all__ = sorted([*_HOMES, *_MODULES])


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    else:
        raise AttributeError(f"remoteops.api has no {name!r}; the plugin API is: "
                             f"{', '.join(__all__)}")
    globals()[name] = value  # later uses skip this function
    return value


def __dir__() -> list[str]:
    return __all__
