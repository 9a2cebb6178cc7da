"""Training numbers from log lines, parsed per trainer's line format (pure Python).

Each format reads one line (a tqdm bar's ``\\r`` updates count as lines of their own) and
returns the ``Record`` s on it: loss, gradient norm, learning rate and step, any of them
missing. The formats, tried in this order, the first that reads the line winning:

- ``hf_dict``: the HF Trainer's log dicts, as LLaMA-Factory and axolotl print them too:
  ``{'loss': 0.0, 'grad_norm': nan, 'learning_rate': 2e-05, 'epoch': 0.27}``, the
  strings of transformers 5 (``{'loss': '0.0', 'grad_norm': 'nan'}``) and JSON lines
  (``{"loss": NaN}``). Only a dict with ``loss`` is a training step: an eval dict
  (``eval_loss``) or the final summary (``train_loss``) is not.
- ``torchtune``: its progress bar ``1|12|Loss: 2.345`` and its stdout metric logger
  ``Step 12 | loss:2.345 lr:2e-05 grad_norm:1.2``.
- ``lightning``: PyTorch Lightning's progress bars, tqdm (``Epoch 0:  40%|...| 4/10
  [00:01<00:01, v_num=0, train_loss=nan]``) and rich (``... v_num: 0 train_loss: nan``):
  ``train_loss_step``, ``train_loss`` or ``loss``; never ``val_*``.
- ``plain``: ``step 12 loss 2.345``, ``loss=nan``, ``train_loss: inf`` (``loss``,
  ``train_loss`` or ``training loss``; not ``eval loss`` or ``val_loss``), with
  ``grad_norm`` and ``lr`` when there.

A project's own ``loss_pattern`` (first group: the loss) is tried before them all.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

NUM = r"[-+]?(?:nan|inf(?:inity)?|\d+(?:\.\d*)?(?:e[-+]?\d+)?|\.\d+(?:e[-+]?\d+)?)"
_VALUE = rf"""(?:tensor\(\s*)?['"]?({NUM})['"]?"""


@dataclass
class Record:
    """The numbers of one training step as a log line shows them."""

    format: str
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    step: int | None = None


def number(text: str) -> float:
    """A float from log text; what is not a number counts as NaN (it is no valid loss)."""
    text = text.strip().strip("'\"")
    if text.lower().startswith("tensor("):
        text = text[7:].split(",")[0].rstrip(")").strip()
    try:
        return float(text)
    except ValueError:
        return math.nan


# -- hf_dict -------------------------------------------------------------------------------
_ANY_DICT = re.compile(r"\{\s*['\"][^'\"]+['\"]\s*:")
_DICT = re.compile(r"\{[^{}]*['\"]loss['\"]\s*:[^{}]*\}")
_PAIR = re.compile(r"""(['"])(?P<key>[^'"]+)\1\s*:\s*"""
                   r"""(?P<val>'[^']*'|"[^"]*"|tensor\([^)]*\)|[^,}]+)""")


def hf_dict(line: str) -> list[Record]:
    out = []
    for m in _DICT.finditer(line):
        pairs = {p.group("key"): p.group("val") for p in _PAIR.finditer(m.group(0))}
        if "loss" not in pairs:
            continue
        lr = pairs.get("learning_rate", pairs.get("lr"))
        step = pairs.get("step", pairs.get("global_step"))
        out.append(Record("hf_dict", number(pairs["loss"]),
                          number(pairs["grad_norm"]) if "grad_norm" in pairs else None,
                          number(lr) if lr is not None else None,
                          int(number(step)) if step is not None and
                          math.isfinite(number(step)) else None))
    return out


# -- torchtune -----------------------------------------------------------------------------
_TT_BAR = re.compile(rf"(?<![\w|])\d+\|(\d+)\|Loss: ({NUM})", re.I)
_TT_LOGGER = re.compile(r"^\s*Step (\d+) \| (.*)$")
_TT_PAIR = re.compile(rf"([A-Za-z_][\w/]*):({NUM})(?=\s|$)", re.I)


def torchtune(line: str) -> list[Record]:
    m = _TT_BAR.search(line)
    if m:
        return [Record("torchtune", number(m.group(2)), step=int(m.group(1)))]
    m = _TT_LOGGER.match(line)
    if m:
        pairs = {k.lower(): number(v) for k, v in _TT_PAIR.findall(m.group(2))}
        if "loss" in pairs:
            return [Record("torchtune", pairs["loss"], pairs.get("grad_norm"), pairs.get("lr"),
                           int(m.group(1)))]
    return []


# -- lightning -----------------------------------------------------------------------------
_PL_BAR = re.compile(r"^\s*(?:Epoch|Training)\b[^|]*?\d+\s*(?:/\s*\d+)?\s*[:|━\s]")
_PL_TQDM = re.compile(r"([A-Za-z_][\w/.-]*)=([^,\]\s]+)")
_PL_RICH = re.compile(rf"([A-Za-z_][\w/.-]*): ({NUM})(?=\s|$)", re.I)
_PL_LOSS_KEYS = ("train_loss_step", "train/loss_step", "train_loss", "train/loss", "loss_step",
                 "loss", "train_loss_epoch")
_PL_GRAD_KEYS = ("grad_norm", "train/grad_norm", "train_grad_norm", "grad_2.0_norm_total")


def lightning(line: str) -> list[Record]:
    if not _PL_BAR.match(line) or not ("it/s" in line or "s/it" in line or "%|" in line
                                       or "━" in line or "v_num" in line):
        return []
    pairs = {k: v for k, v in _PL_TQDM.findall(line)}
    pairs.update({k: v for k, v in _PL_RICH.findall(line) if k not in pairs})
    loss = next((pairs[k] for k in _PL_LOSS_KEYS if k in pairs), None)
    if loss is None:
        return []
    grad = next((pairs[k] for k in _PL_GRAD_KEYS if k in pairs), None)
    return [Record("lightning", number(loss), number(grad) if grad is not None else None)]


# -- plain ---------------------------------------------------------------------------------
_PLAIN_LOSS = re.compile(rf"(?<![\w./-])(?:train(?:ing)?[_ ])?['\"]?loss['\"]?\s*(?:[:=]\s*|\s+)"
                         rf"{_VALUE}", re.I)
_NOT_TRAIN = re.compile(r"(?:eval|val|valid|validation|test|dev|avg|mean)[\s_-]*$", re.I)
_PLAIN_STEP = re.compile(r"(?<![\w])(?:global[_ ])?step\s*[:=#]?\s*(\d+)", re.I)
_PLAIN_GRAD = re.compile(rf"(?<![\w])grad(?:ient)?[_ ]norm\s*(?:[:=]\s*|\s+){_VALUE}", re.I)
_PLAIN_LR = re.compile(rf"(?<![\w])(?:lr|learning[_ ]rate)\s*(?:[:=]\s*|\s+){_VALUE}", re.I)


def plain(line: str) -> list[Record]:
    out = []
    for m in _PLAIN_LOSS.finditer(line):
        if _NOT_TRAIN.search(line[max(0, m.start() - 12):m.start()]):
            continue
        step = _PLAIN_STEP.search(line)
        grad = _PLAIN_GRAD.search(line)
        lr = _PLAIN_LR.search(line)
        out.append(Record("plain", number(m.group(1)),
                          number(grad.group(1)) if grad else None,
                          number(lr.group(1)) if lr else None,
                          int(step.group(1)) if step else None))
        break  # one step per line
    return out


FORMATS: tuple[tuple[str, Callable[[str], list[Record]]], ...] = (
    ("hf_dict", hf_dict), ("torchtune", torchtune), ("lightning", lightning), ("plain", plain))


def custom(pattern: re.Pattern) -> Callable[[str], list[Record]]:
    """A project's ``loss_pattern`` as a format: every match's first group is a loss."""
    def parse(line: str) -> list[Record]:
        return [Record("loss_pattern", number(m.group(1))) for m in pattern.finditer(line)]
    return parse


def parse_line(line: str, pattern: re.Pattern | None = None) -> list[Record]:
    """The records on one line: the project's pattern first, then the first format that
    reads the line."""
    if pattern is not None:
        found = custom(pattern)(line)
        if found:
            return found
    if "loss" not in line.lower():
        return []
    if _ANY_DICT.search(line):  # a logged dict is read as one: its train_loss is a summary
        return hf_dict(line)
    for _, parse in FORMATS:
        found = parse(line)
        if found:
            return found
    return []


__all__ = ["Record", "FORMATS", "parse_line", "number", "NUM"]
