"""The built-in trainer under torchrun (data-parallel, one process per rank).

Which process this is (``RANK``, ``WORLD_SIZE``: torchrun, accelerate and DeepSpeed set
them), the health verdict agreed by every rank before an optimizer step (``agree``), and
the one repair the HF Trainer needs (``undo_eval_preparation``). Rank 0 speaks and writes
for the stage (signals, metrics, summary, adapter); another rank writes only its own
crash (``failed``), since torchrun then ends every rank. On a run spanning several machines
the first rank of each other machine (``leads_node``) also writes the agreed ``failed``
verdict into its machine's run directory, and every machine keeps its own checkpoints.
"""

from __future__ import annotations

import os
from typing import Any


def rank() -> int:
    return int(os.environ.get("RANK") or 0)


def local_rank() -> int:
    """This process's rank on its machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or 1)


def is_main() -> bool:
    return rank() == 0


def leads_node() -> bool:
    """The first process on its machine: on a machine other than rank 0's (a run spanning
    several hosts, with no shared filesystem) it writes that machine's own signals."""
    return local_rank() == 0


def spans_nodes() -> bool:
    """Do the ranks live on more than one machine (torchrun's LOCAL_WORLD_SIZE < WORLD_SIZE)?"""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or world_size()) < world_size()


def _group() -> Any:
    """``torch.distributed`` when a process group of more than one rank is up, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def describe() -> str | None:
    """``2 ranks over nccl`` while a process group of several ranks is up, else None."""
    group = _group()
    return f"{group.get_world_size()} ranks over {group.get_backend()}" if group else None


def agree(problem: tuple[str, str] | None) -> tuple[str, str] | None:
    """Every rank's verdict on this step, made one: each rank calls it at the same point
    and gets the same answer (a problem found on any rank stops them all, before the
    optimizer step). One all-reduce of a flag per rank per step; the verdicts themselves
    are gathered only when some rank found one."""
    dist = _group()
    if dist is None:
        return problem
    import torch

    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    if problem:
        flags[dist.get_rank()] = 1
    dist.all_reduce(flags)
    found = [r for r, f in enumerate(flags.tolist()) if f]
    if not found:
        return None
    verdicts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, tuple(problem) if problem else None)
    reason, message = verdicts[found[0]]
    ranks = ", ".join(map(str, found))
    return reason, f"{message} (found on rank{'s' if len(found) > 1 else ''} {ranks} of " \
                   f"{dist.get_world_size()}; every rank stopped before the optimizer step)"


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    dist = _group()
    if dist is not None:
        dist.barrier()


def undo_eval_preparation(trainer: Any) -> None:
    """After ``trainer.evaluate()`` and before ``trainer.train()`` under torchrun.

    The evaluation marks the model as prepared by accelerate (``_is_accelerate_prepared``),
    and ``train()`` then never wraps it in DistributedDataParallel: every rank would train
    alone on its shard with no gradient all-reduce, silently (found with transformers 5.23
    and accelerate 1.15 on gloo). Forgetting the mark lets ``train()`` wrap it.
    """
    if world_size() < 2:
        return
    model = trainer.model
    if getattr(model, "_is_accelerate_prepared", False):
        try:
            del model._is_accelerate_prepared
        except AttributeError:
            model._is_accelerate_prepared = False
    trainer.accelerator._models = [m for m in trainer.accelerator._models if m is not model]


def is_wrapped_for_ddp(model: Any) -> bool:
    """Whether the model a training step gets is DistributedDataParallel (gradients are
    all-reduced across ranks)."""
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


__all__ = ["rank", "local_rank", "world_size", "is_main", "describe",
           "leads_node", "spans_nodes", "agree", "barrier",
           "undo_eval_preparation", "is_wrapped_for_ddp"]
