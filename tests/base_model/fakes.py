"""Model folders for tests: complete or not, plain or inside a Hugging Face cache layout.

Only completeness matters here, so the weights are a valid safetensors file of random
floats (its header says how long it must be), not a model anyone could load."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from pathlib import Path

TOKENIZER = {"tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
             "tokenizer_config.json": b'{"eos_token": "<|im_end|>"}'}


def safetensors(n_floats: int, seed: int = 0) -> bytes:
    """A valid .safetensors file holding one float32 tensor of ``n_floats`` values."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats],
                               "data_offsets": [0, 4 * n_floats]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + random.Random(seed).randbytes(4 * n_floats)


def model_files(shards: int = 1, floats: int = 1000, seed: int = 0) -> dict[str, bytes]:
    """``{relative path: content}`` of a complete model folder."""
    files = {"config.json": json.dumps({"model_type": "qwen3", "hidden_size": 8}).encode(),
             "generation_config.json": b"{}", **TOKENIZER}
    if shards == 1:
        files["model.safetensors"] = safetensors(floats, seed)
        return files
    weight_map = {}
    for i in range(1, shards + 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        files[name] = safetensors(floats, seed + i)
        weight_map[f"layer{i}.w"] = name
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": 4 * floats * shards}, "weight_map": weight_map}).encode()
    return files


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def write_hf_cache(hub: Path, repo_id: str, files: dict[str, bytes], commit: str = "c" * 40,
                   revision: str = "main") -> Path:
    """The layout huggingface_hub writes: blobs named by sha256, snapshot links, refs."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for rel, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snap


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (links followed), our upload area left out."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not rel.startswith(".remoteops-incoming"):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
