"""The built-in trainer's ``transformers.Trainer``: it feeds each micro-batch loss to the
health watch and injects the drills' faults (``train.inject_fault``: ``nan@STEP``,
``explode@STEP``, ``oom@STEP``, ``oom>BATCH``, ``cuda@STEP``, ``kill@STEP``: SIGKILL, not
repeated by the resumed run; ``hang@STEP``: sleeps until something ends it (a scheduler's time
limit), not repeated by the resumed run; ``:rankN`` limits a drill to
one torchrun rank)."""

from __future__ import annotations

import os
import signal
import time

from remoteops.common.errors import ConfigError
from remoteops.trainer.distributed import is_wrapped_for_ddp, rank, world_size


def trainer_class():
    import torch
    from transformers import Trainer

    class RemoteOpsTrainer(Trainer):
        """Feeds each micro-batch loss to the health watch; can inject drills' faults."""

        def __init__(self, *args, health=None, fault: str = "", **kwargs):
            super().__init__(*args, **kwargs)
            self.health = health
            fault, _, only = (fault or "").partition(":rank")  # a drill on one torchrun rank
            fault = fault if not only or int(only) == rank() else ""
            # "oom>N" (fault injection for tests and drills): every micro-batch of more than
            # N rows raises a real torch OOM error, as a too-large batch would on a GPU
            self.oom_above = int(fault[4:]) if (fault or "").startswith("oom>") else None
            kind, _, at = ("" if self.oom_above else fault or "").partition("@")
            self.fault_kind, self.fault_step = kind, int(at or 1)
            self.first_step: int | None = None  # > 0: this run resumed from a checkpoint

        def _fault_now(self, kinds: tuple[str, ...], from_on: bool = False) -> bool:
            if self.fault_kind not in kinds:
                return False
            step = self.state.global_step + 1
            return step >= self.fault_step if from_on else step == self.fault_step

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.first_step is None:
                self.first_step = self.state.global_step
                if world_size() > 1 and not is_wrapped_for_ddp(model):
                    raise ConfigError(
                        f"under torchrun ({world_size()} ranks) the model is not wrapped in "
                        "DistributedDataParallel, so each rank would train alone; this "
                        "transformers/accelerate pair needs a fix in remoteops.trainer."
                        "distributed, or run the stage with executor = \"process\".")
            if self._fault_now(("kill",)) and self.first_step == 0:  # once: not after a resume
                os.kill(os.getpid(), signal.SIGKILL)  # a rank dying hard (kernel OOM killer)
            if self._fault_now(("hang",)) and self.first_step == 0:  # once: not after a resume
                print(f"train.inject_fault: hanging at step {self.fault_step}", flush=True)
                time.sleep(24 * 3600)  # a stage stuck past its time limit
            rows = len(inputs["input_ids"]) if "input_ids" in inputs else 0
            if self.oom_above is not None and rows > self.oom_above:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by "
                    f"train.inject_fault: a micro-batch of {rows} rows > {self.oom_above})")
            if self._fault_now(("oom",)):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB "
                                             "(injected by train.inject_fault)")
            if self._fault_now(("cuda",)):
                raise RuntimeError("CUDA error: an illegal memory access was encountered "
                                   "(injected by train.inject_fault)")
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.health is not None:
                self.health.observe_loss(loss)
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if model.training and self.fault_kind in ("nan", "explode"):
                scale = None
                if self._fault_now(("nan",)):
                    scale = float("nan")
                elif self._fault_now(("explode",), from_on=True):
                    scale = 1e6
                if scale is not None:
                    if return_outputs:
                        return out[0] * scale, out[1]
                    return out * scale
            return out

    return RemoteOpsTrainer
