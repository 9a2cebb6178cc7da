"""Training and eval data: JSONL reading, validation, chat rendering, tokenization.

Two line formats are accepted, mixed freely in one file:

* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* instruction: ``{"instruction": "...", "input": "...", "output": "..."}``

Eval sets use ``{"prompt", "input"?, "system"?, "reference", "key_points",
"format_rules"}`` (or either training format, for eval loss only).
A malformed line is reported as ``file:line: problem``; up to
``train.max_bad_lines`` are skipped (and counted), one more is an error.
Parsing needs no torch; ``encode`` needs a tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remoteops.common.errors import ConfigError

ROLES = ("system", "user", "assistant")


class DataError(ConfigError):
    """A data file is missing or malformed (the stage fails with reason ``data``)."""

IGNORE = -100


@dataclass
class Record:
    """One usable line: where it came from and its chat messages."""

    where: str
    messages: list[dict[str, str]]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataReport:
    """What reading a file found."""

    path: str
    records: list[Record]
    bad: list[str]          # "file:line: problem"

    @property
    def skipped(self) -> int:
        return len(self.bad)


def _display(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            pass
    return str(path)


def to_messages(row: Any) -> list[dict[str, str]]:
    """Chat messages of a training line; raises ValueError naming the problem."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        out = []
        for i, msg in enumerate(msgs):
            if not isinstance(msg, dict):
                raise ValueError(f"messages[{i}] is not an object")
            role, content = msg.get("role"), msg.get("content")
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string")
            out.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
            raise ValueError("no non-empty assistant message to learn from")
        return out
    if "instruction" in row or "output" in row:
        instruction, inp, output = row.get("instruction"), row.get("input", ""), row.get("output")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("'instruction' must be a non-empty string")
        if not isinstance(output, str) or not output.strip():
            raise ValueError("'output' must be a non-empty string")
        if inp is None:
            inp = ""
        if not isinstance(inp, str):
            raise ValueError("'input' must be a string")
        user = instruction.strip() + (f"\n\n{inp.strip()}" if inp.strip() else "")
        out = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
        return out + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    raise ValueError("neither chat format ('messages') nor instruction format "
                     "('instruction'/'output')")


def eval_messages(row: Any) -> tuple[list[dict[str, str]], str | None]:
    """Prompt messages and reference answer of an eval-set line."""
    if isinstance(row, dict) and "prompt" in row:
        prompt, reference = row.get("prompt"), row.get("reference")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("'prompt' must be a non-empty string")
        if reference is not None and not isinstance(reference, str):
            raise ValueError("'reference' must be a string")
        for key in ("key_points", "format_rules"):
            if key in row and not isinstance(row[key], list):
                raise ValueError(f"'{key}' must be a list")
        user = prompt.strip() + (f"\n\n{row['input'].strip()}" if isinstance(row.get("input"), str)
                                 and row["input"].strip() else "")
        msgs = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
        return msgs + [{"role": "user", "content": user}], reference
    msgs = to_messages(row)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"]


def read_jsonl(path: str | Path, max_bad_lines: int = 0, kind: str = "train",
               base: Path | None = None) -> DataReport:
    """Read and validate a JSONL file; raise ConfigError past ``max_bad_lines`` bad lines."""
    path = Path(path)
    shown = _display(path, base)
    if not path.is_file():
        raise DataError(f"data file {shown} not found; check the stage's dataset/eval_set path "
                          "(relative to the project folder).")
    records: list[Record] = []
    bad: list[str] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{shown}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(f"{where}: not UTF-8 text")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                bad.append(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            try:
                if kind == "eval":
                    prompt, reference = eval_messages(row)
                    extra = {k: row.get(k) for k in ("key_points", "format_rules")} \
                        if isinstance(row, dict) else {}
                    extra["reference"] = reference
                    records.append(Record(where, prompt, extra))
                else:
                    records.append(Record(where, to_messages(row)))
            except ValueError as exc:
                bad.append(f"{where}: {exc}")
    if len(bad) > max_bad_lines:
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}; fix the line, or set train.max_bad_lines to skip up to "
                          f"that many bad lines.")
    if not records:
        raise DataError(f"{shown} holds no usable lines; add JSONL lines in chat or "
                          "instruction format.")
    return DataReport(shown, records, bad)


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The tokenizer's chat template applied to ``messages`` (ChatML when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def encode(tokenizer, messages: list[dict[str, str]], max_seq_len: int) -> dict[str, list[int]]:
    """Token ids and labels; labels are -100 except on assistant replies (and their end tag)."""
    full = render(tokenizer, messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start_text = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        end_text = render(tokenizer, messages[:i + 1])
        if not full.startswith(start_text) or not full.startswith(end_text):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "use a ChatML-style template")
        spans.append((len(start_text), len(end_text)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    for tok_id, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = any(a <= start < b or (start == end and a < end <= b) for a, b in spans)
        labels.append(tok_id if inside else IGNORE)
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if len(ids) < 2 or all(x == IGNORE for x in labels[1:]):
        raise ValueError(f"no assistant tokens within max_seq_len={max_seq_len}")
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def encode_records(tokenizer, records: list[Record], max_seq_len: int,
                   max_bad: int, bad: list[str]) -> list[dict[str, list[int]]]:
    """Encode every record; lines that cannot be encoded join ``bad`` (error past ``max_bad``)."""
    out = []
    for rec in records:
        try:
            out.append(encode(tokenizer, rec.messages, max_seq_len))
        except ValueError as exc:
            bad.append(f"{rec.where}: {exc}")
            if len(bad) > max_bad:
                raise DataError(f"{bad[-1]}; fix the line, raise train.max_seq_len, or set "
                                  "train.max_bad_lines to skip it.") from None
    return out


class Collator:
    """Right-pads a batch; counts the real tokens it has seen (for tokens/s)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.tokens = 0

    def __call__(self, batch: list[dict[str, list[int]]]):
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids, labels, mask = [], [], []
        for b in batch:
            pad = width - len(b["input_ids"])
            ids.append(b["input_ids"] + [self.pad_id] * pad)
            labels.append(b["labels"] + [IGNORE] * pad)
            mask.append(b["attention_mask"] + [0] * pad)
            self.tokens += len(b["input_ids"])
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "attention_mask": torch.tensor(mask)}
