"""Shared pieces of the quantization checks (public: plugins may import them).

A quantization check is an object registered through the
``register_quant_checks`` hook as ``register(name, check)``; it has a
``run(job) -> dict`` method (``job`` is a :class:`QuantJob`) and may name the
settings table it reads with ``settings_key`` (default: ``name``, read from
``[plugins.<settings_key>]``). Its result holds at least ``verdict`` (one of
:data:`VERDICTS`) and ``reason``; per quantized variant a ``rows`` list with
``type``, ``size_bytes``, ``ppl_delta``, ``tokens_per_s``, ``verdict``.

Nothing here imports torch at import time.
"""

from __future__ import annotations

from typing import Any, Iterable

from remoteops.quant.job import QuantJob, perplexity_from_logits

FEASIBLE = "feasible"
WITH_LOSS = "feasible with loss"
NOT_FEASIBLE = "not feasible"
SKIPPED = "skipped"
VERDICTS = (FEASIBLE, WITH_LOSS, NOT_FEASIBLE, SKIPPED)
DEFAULT_PPL_DELTA_BOUND = 0.05   # above this: feasible with loss
DEFAULT_PPL_DELTA_FAIL = 1.0     # above this (perplexity doubled): not feasible

__all__ = ["QuantJob", "perplexity_from_logits", "VERDICTS", "FEASIBLE", "WITH_LOSS",
           "NOT_FEASIBLE", "SKIPPED", "row_verdict", "overall_verdict", "skipped",
           "missing_modules"]


def row_verdict(ppl_delta: float | None, problems: Iterable[str] = (),
                bound: float = DEFAULT_PPL_DELTA_BOUND,
                fail: float = DEFAULT_PPL_DELTA_FAIL) -> tuple[str, str]:
    """The verdict of one quantized variant from its perplexity delta and any problems."""
    problems = [p for p in problems if p]
    if problems:
        return NOT_FEASIBLE, "; ".join(problems)
    if ppl_delta is None:
        return NOT_FEASIBLE, "perplexity could not be measured"
    if ppl_delta > fail:
        return NOT_FEASIBLE, f"perplexity {ppl_delta:+.1%}, above the {fail:.0%} failure bound"
    if ppl_delta > bound:
        return WITH_LOSS, f"perplexity {ppl_delta:+.2%}, above the {bound:.0%} bound"
    return FEASIBLE, f"perplexity {ppl_delta:+.2%}, within the {bound:.0%} bound"


def overall_verdict(rows: list[dict]) -> tuple[str, str]:
    """A check's verdict from its rows: the best verdict reached, naming the types per verdict."""
    if not rows:
        return NOT_FEASIBLE, "nothing was measured"
    by: dict[str, list[str]] = {}
    for row in rows:
        by.setdefault(row["verdict"], []).append(str(row["type"]))
    for verdict in (FEASIBLE, WITH_LOSS, NOT_FEASIBLE, SKIPPED):
        if verdict in by:
            reason = "; ".join(f"{v}: {', '.join(t)}" for v, t in by.items())
            if verdict in (NOT_FEASIBLE, SKIPPED):
                reason = "; ".join(f"{r['type']}: {r.get('reason')}" for r in rows)
            return verdict, reason
    return NOT_FEASIBLE, "no verdict"


def skipped(check: str, reason: str, **extra: Any) -> dict[str, Any]:
    """A check's result when a dependency or input is missing (never silent)."""
    return {"check": check, "verdict": SKIPPED, "reason": reason, "rows": [], **extra}


def missing_modules(names: Iterable[str]) -> list[str]:
    """``name: error`` for each module that cannot be imported (also when blocked in sys.modules)."""
    import importlib

    out = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken install raising anything
            out.append(f"{name} ({type(exc).__name__}: {exc})")
    return out
