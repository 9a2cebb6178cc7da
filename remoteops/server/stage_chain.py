"""Which stages run together as one chain: consecutive stages whose executors give the same
``chain_key`` (the ``slurm`` executor with ``[slurm] chain = "upfront"``: their jobs are
submitted at once, each ``afterok`` on the one before). The runner hands such a group to the
first stage's executor (``run_chain``); every other stage runs on its own (``run_stage``)."""

from __future__ import annotations

from typing import Any

CHAINABLE = ("train", "command")  # precheck runs in the runner, collect on the laptop


def chain_from(runner: Any, first: dict) -> tuple[Any, list[dict]] | None:
    """``(executor of the first stage, the stages)`` when ``first`` and at least the stage
    after it chain together, else None (also when an executor cannot be had: the stage then
    fails on its own with the reason)."""
    stages = runner.state["stages"]
    group: list[dict] = []
    key = None
    lead = None
    for stage in stages[stages.index(first):]:
        if stage["kind"] not in CHAINABLE or stage["status"] in ("done", "skipped"):
            break
        try:
            executor = runner.executor(stage)
            mine = executor.chain_key()
        except Exception:  # a bad executor setting: that stage fails alone, with the reason
            break
        if mine is None or (key is not None and mine != key):
            break
        key, lead = mine, lead or executor
        group.append(stage)
    return (lead, group) if len(group) >= 2 else None


__all__ = ["chain_from"]
