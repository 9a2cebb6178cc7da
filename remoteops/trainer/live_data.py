"""The built-in trainer on a live dataset (``[stages.X] dataset_live``): start at
``min_samples``, grow while training, one process, no restart.

How it fits ``transformers.Trainer``, which fixes a dataset's length when ``train()``
starts: the stage trains from an ``IterableDataset`` over a ``LiveSchedule``
(``trainer/live_schedule``: rounds, joins, waiting, replay), with ``max_steps`` (the stage's
``max_steps``, else effectively unbounded) and a callback that stops the loop when the
schedule ends. One ``train()`` call keeps one optimizer, scheduler and step counter, and
HF's checkpoints stay what they are. (A loop of ``train()`` calls would rebuild the
scheduler each time and restart ``global_step``, so its checkpoints would collide.)

- The loader is a plain ``DataLoader`` (no read-ahead), so a step trains as soon as its
  records are there, and waiting for data never holds a complete step back.
- Gradient accumulation is done here, not by HF: each batch the loader yields is one
  optimizer step of ``batch_size x grad_accum`` records, split into micro-batches of
  ``batch_size`` inside ``training_step`` (same memory and loss scaling as HF's own
  accumulation). So the last step of a set that does not divide evenly is a smaller step,
  not a lost one, and "records trained" is exact after every optimizer step.
- Without ``max_steps`` the total is unknown until the producer says done, so the learning
  rate is held after warmup (``constant_with_warmup``); a share ``warmup_steps`` < 1 is of
  the steps the first ``min_samples`` need. With ``max_steps`` the configured scheduler runs.
- No eval during training (HF's epochs mean nothing here); the stage's ``eval_set`` is
  still used before and after. A checkpoint is saved whenever a round ends or data joined.
- The schedule's state (``LiveSchedule.state_at`` the trained position) rides in each
  checkpoint's ``trainer_state.json`` (an ``ExportableState`` callback: written last, with
  the checkpoint). A resume replays it and truncates ``live_<stage>.consumed.jsonl``.
- ``live_<stage>.consumed.jsonl`` lists every record trained, one JSON line each
  (``step``, ``id``, ``record``, ``round``, ``at``); ``live_<stage>.json`` is the status line
  (``common/live_status``); ``metrics.csv`` gains ``samples`` (the set's size) and ``seen``
  (records trained).

A sample is read as training lines: a ``.jsonl`` file (each line), a ``.json`` file (one
object, or a list of them), or a folder (its ``*.jsonl`` and ``*.json`` files, sorted);
other files are ignored. A bad line counts against ``train.max_bad_lines``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from remoteops.common.clock import now_iso_precise
from remoteops.common.errors import ConfigError, RemoteOpsError
from remoteops.common.live_set import LiveSet
from remoteops.common.live_status import write_status
from remoteops.common.rundir import RunDir
from remoteops.trainer.data import DataError, Record, encode_records, to_messages
from remoteops.trainer.live_schedule import LiveSchedule, restore

UNBOUNDED_STEPS = 10**9


def sample_records(path: Path, name: str) -> tuple[list[Record], list[str]]:
    """The training lines of one sample, and its bad ones (``name:line: problem``)."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json"))
    records, bad = [], []
    for file in files:
        where = name if file == path else f"{name}/{file.relative_to(path).as_posix()}"
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            bad.append(f"{where}: cannot read ({exc})")
            continue
        if file.suffix == ".json":
            rows: list[tuple[str, str]] = [(where, text)]
        else:
            rows = [(f"{where}:{n}", line) for n, line in enumerate(text.splitlines(), 1)
                    if line.strip()]
        for at, raw in rows:
            try:
                value = json.loads(raw)
                for row in value if isinstance(value, list) else [value]:
                    records.append(Record(at, to_messages(row)))
            except ValueError as exc:
                bad.append(f"{at}: {exc}")
    if not files:
        bad.append(f"{name}: no .jsonl or .json file in it")
    return records, bad


def records_now(cfg, tokenizer) -> tuple[list[dict], list[str], str]:
    """A dry run's view: the live set's records now, its bad lines, and a line about it."""
    live = LiveSet(cfg.live["dest"], cfg.live["min_samples"])
    entries, bad, records = live.entries(), [], []
    for entry in entries:
        found, wrong = sample_records(live.path_of(entry), entry["id"])
        bad += wrong
        records += encode_records(tokenizer, found, cfg.train["max_seq_len"], 10**9, bad)
    if len(bad) > cfg.train["max_bad_lines"]:
        raise DataError(f"{bad[0]} (and {len(bad) - 1} more); fix the sample, or set "
                        "train.max_bad_lines.")
    if not records:
        raise DataError(f"{live.dest} holds no samples yet; a dry run checks what is there: "
                        "run 'invoke sync-data' first (the stage itself waits for them).")
    state = "complete" if live.complete() else "open: more may come"
    return records, bad, (f"live set {live.dest}: {len(entries)} samples now (the stage starts "
                          f"at {live.min_samples}), {state}; the plan below is for these")


class LiveRun:
    """One attempt of a stage on a live dataset: its schedule, dataset, trainer and callback."""

    def __init__(self, cfg, run: RunDir, log: Callable[[str], None]):
        live = cfg.live
        self.cfg, self.run, self.log = cfg, run, log
        self.set = LiveSet(live["dest"], live["min_samples"], live["poll_seconds"])
        self.max_steps = int(live["max_steps"])
        self.per_step = cfg.train["batch_size"] * cfg.train["grad_accum"]
        self.bad: list[str] = []
        self.tokenizer = None
        self.schedule: LiveSchedule | None = None
        self.trained = 0       # records trained by finished optimizer steps
        self.rows_in_step = 0  # records of the step under way
        self.growth: list[dict] = []
        self.waited_s = 0.0
        self._since: float | None = None
        self.consumed = run.path / f"live_{cfg.name}.consumed.jsonl"

    # -- before training ---------------------------------------------------------------
    def status(self, line: str, waiting: bool = False) -> None:
        s = self.schedule
        if not waiting:
            self._since = None
        elif self._since is None:  # a wait starts: status shows how long it has lasted
            self._since = time.time()
        write_status(self.run.path, self.cfg.name, line=line, waiting=waiting, since=self._since,
                     dest=str(self.set.dest), min_samples=self.set.min_samples,
                     samples=s.size_at(self.trained) if s else len(self.set.entries()),
                     trained=self.trained, round=s.rounds_started(self.trained) if s else 0,
                     complete=self.set.complete())

    def _waiting(self, line: str) -> None:
        self.log(line)
        self.status(line, waiting=True)

    def wait_ready(self) -> int:
        t0 = time.monotonic()
        try:
            count = self.set.wait_ready(self._waiting)
        except RemoteOpsError as exc:  # a set marked complete with nothing in it
            raise DataError(str(exc)) from None
        self.waited_s = round(time.monotonic() - t0, 1)
        return count

    def start(self, tokenizer, resume: Path | None) -> None:
        """Build the schedule, from scratch or replaying the checkpoint ``resume``."""
        self.tokenizer = tokenizer
        kwargs = dict(on_wait=self._waiting, on_join=self._joined)
        if resume is not None:
            state = checkpoint_state(resume)
            try:
                self.schedule = restore(self.set, state, self._load, **kwargs)
            except DataError:
                raise
            except RemoteOpsError as exc:  # its samples changed or vanished: not a retry
                raise DataError(str(exc)) from None
            self.trained = int(state["trained"])
            self.growth = list(state.get("growth") or [])
            self.waited_s = float(state.get("waited_s") or 0.0) + self.waited_s
            self._truncate_consumed(self.trained)
            self.log(f"live data: resuming after {self.trained} trained records "
                     f"({self.schedule.size_at(self.trained)} samples had joined)")
        else:
            self.consumed.unlink(missing_ok=True)
            self.schedule = LiveSchedule(
                self.set, self._load, visits=max(1, round(self.cfg.train["epochs"])),
                seed=self.cfg.train["seed"],
                grow_every=self.cfg.live["grow_every_steps"] * self.per_step, **kwargs)

    def _load(self, entry: dict) -> list[dict]:
        records, bad = sample_records(self.set.path_of(entry), entry["id"])
        self.bad += bad
        for line in bad:
            self.log(f"skipped {line}")
        encoded = encode_records(self.tokenizer, records, self.cfg.train["max_seq_len"],
                                 10**9, self.bad)
        if len(self.bad) > self.cfg.train["max_bad_lines"]:
            raise DataError(f"{self.bad[-1]}; fix the sample (a new version under a new name), "
                            "or set train.max_bad_lines to skip up to that many bad lines.")
        return encoded

    def _joined(self, pos: int, ids: list[str]) -> None:
        if pos and self.schedule is not None:  # not the start, nor a resume's replay
            self.log(f"live data: {len(ids)} new sample(s) join at record {pos} "
                     f"({len(self.schedule.joined)} in all)")

    def _truncate_consumed(self, keep: int) -> None:
        if not self.consumed.exists():
            return
        lines = self.consumed.read_text(encoding="utf-8").splitlines(keepends=True)
        self.consumed.write_text("".join(lines[:keep]), encoding="utf-8")

    # -- what run_train hands to transformers ------------------------------------------
    def training_overrides(self) -> dict[str, Any]:
        t = self.cfg.train
        extra: dict[str, Any] = dict(
            per_device_train_batch_size=self.per_step, gradient_accumulation_steps=1,
            max_steps=self.max_steps or UNBOUNDED_STEPS, eval_strategy="no",
            save_strategy="no", load_best_model_at_end=False, metric_for_best_model=None,
            ignore_data_skip=True)  # the schedule resumes itself; HF must not skip batches
        if not self.max_steps:
            extra["lr_scheduler_type"] = "constant_with_warmup"
            if 0 < t["warmup_steps"] < 1:
                first = math.ceil(self.set.min_samples * max(1, round(t["epochs"]))
                                  / self.per_step)
                extra["warmup_steps"] = max(1, round(t["warmup_steps"] * first))
        return extra

    def dataset(self):
        from torch.utils.data import IterableDataset

        run = self

        class LiveDataset(IterableDataset):
            def __iter__(self):
                while True:
                    item = run.schedule.next()
                    if item is None:
                        return
                    yield item[2]

        return LiveDataset()

    def trainer_class(self, base):
        run, micro = self, self.cfg.train["batch_size"]

        class LiveTrainer(base):
            """One loader batch = one optimizer step, trained in micro-batches."""

            def training_step(self, model, inputs, num_items_in_batch=None):
                rows = len(inputs["input_ids"])
                if rows <= micro:
                    loss = super().training_step(model, inputs, num_items_in_batch)
                else:
                    chunks = []
                    for i in range(0, rows, micro):
                        part = {k: v[i:i + micro] for k, v in inputs.items()}
                        width = int(part["attention_mask"].sum(1).max())
                        chunks.append({k: v[:, :width] for k, v in part.items()})
                    self.current_gradient_accumulation_steps = len(chunks)
                    loss = sum(super(LiveTrainer, self).training_step(model, c, num_items_in_batch)
                               for c in chunks)
                run.rows_in_step += rows
                return loss

            def get_train_dataloader(self):
                """A plain loader: accelerate's reads one batch ahead, which would hold a
                complete step back until the next one's data arrived."""
                from torch.utils.data import DataLoader

                return DataLoader(self.train_dataset, batch_size=self._train_batch_size,
                                  collate_fn=self.data_collator, num_workers=0)

            def get_batch_samples(self, epoch_iterator, num_batches, device):
                batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
                if not batches:  # the schedule ended: stop, do not spin to max_steps
                    self.control.should_training_stop = True
                return batches, items

        return LiveTrainer

    def metrics_extra(self) -> dict[str, Any]:
        return {"samples": self.schedule.size_at(self.trained), "seen": self.trained}

    def callback(self) -> "LiveCallback":
        return LiveCallback(self)

    def finish(self) -> None:
        s = self.schedule
        self.status(f"trained {self.trained} records of {s.size_at(self.trained)} samples in "
                    f"{s.rounds_started(self.trained)} round(s)"
                    f"{'; the set is complete' if self.set.complete() else ''}")

    def summary(self) -> dict[str, Any]:
        s = self.schedule
        return {"dest": str(self.set.dest), "min_samples": self.set.min_samples,
                "waited_s": self.waited_s,
                "start_samples": len(s.events[0]["ids"]) if s and s.events else 0,
                "samples": s.size_at(self.trained) if s else 0,
                "records_trained": self.trained,
                "rounds": s.rounds_started(self.trained) if s else 0,
                "visits": s.visits if s else None, "complete": self.set.complete(),
                "bad_lines": len(self.bad), "growth": self.growth,
                "consumed_file": self.consumed.name}


class LiveCallback(TrainerCallback, ExportableState):
    """Counts records trained per step, writes the consumed list, status and growth marks,
    saves a checkpoint when a round ends or data joined, stops when the schedule ends."""

    def __init__(self, run: LiveRun):
        self.live = run

    def state(self) -> dict:
        return {"args": {}, "attributes": {
            "live": {**self.live.schedule.state_at(self.live.trained),
                     "growth": self.live.growth, "waited_s": self.live.waited_s}}}

    def on_step_end(self, args, state, control, **kwargs):
        run, sched = self.live, self.live.schedule
        before, after = run.trained, run.trained + run.rows_in_step
        run.rows_in_step = 0
        rounds = {start: n for n, (start, _) in enumerate(sched.round_starts, 1)}
        current = sched.rounds_started(before + 1)
        with open(run.consumed, "a", encoding="utf-8") as fh:
            for pos in range(before, after):
                current = rounds.get(pos, current)
                sid, record = sched.history[pos]
                fh.write(json.dumps({"step": state.global_step, "id": sid, "record": record,
                                     "round": current, "at": now_iso_precise()}) + "\n")
        run.trained = after
        state.epoch = sched.epoch_at(after)
        size_before, size_after = sched.size_at(before), sched.size_at(after)
        if size_after > size_before and before:
            run.growth.append({"step": state.global_step, "samples": size_after})
            run.log(f"data grew: {size_before} -> {size_after} samples at step "
                    f"{state.global_step} (round {sched.rounds_started(after)})")
        new_round = sched.rounds_started(after) > sched.rounds_started(before)
        if before and (new_round or size_after > size_before):
            control.should_save = True  # a checkpoint at each epoch boundary and growth
        if sched.finished and after >= sched.pos:
            control.should_training_stop = True
        elif run.max_steps and state.global_step >= run.max_steps:
            run.log(f"live data: stopping at max_steps = {run.max_steps}")
        run.status(f"training on {size_after} samples: {after} records trained, round "
                   f"{sched.rounds_started(after)}")


def checkpoint_state(checkpoint: Path) -> dict:
    """The live schedule's state saved in ``checkpoint`` (refused when it has none)."""
    try:
        data = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        return data["stateful_callbacks"]["LiveCallback"]["attributes"]["live"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"checkpoint {checkpoint} holds no live-data state (it was not saved "
                          "by a stage on dataset_live); start the stage afresh.") from None


__all__ = ["LiveRun", "LiveCallback", "checkpoint_state", "sample_records"]
