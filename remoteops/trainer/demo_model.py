"""The demo project and its tiny model (no network, a few seconds on a CPU).

``build_demo_model`` makes a Qwen3-architecture causal LM with random weights
(hidden size 256 so GGUF k-quants apply, 2 layers) and a byte-level BPE
tokenizer trained on the demo data, with a ChatML-like chat template, saved
as an ordinary Hugging Face model directory. ``copy_demo_project`` copies the
demo's ``remoteops.toml`` and data into a folder so it can be run as a project.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as the Qwen family uses it (without Qwen3's <think> handling).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def copy_demo_project(dest: str | Path) -> Path:
    """Copy the demo's ``remoteops.toml`` and ``data/`` into ``dest`` (created); returns it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(DEMO_DIR / "remoteops.toml", dest / "remoteops.toml")
    shutil.copytree(DEMO_DIR / "data", dest / "data", dirs_exist_ok=True)
    return dest


def _texts(files: Iterable[Path]) -> Iterable[str]:
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict):
                continue
            for msg in row.get("messages") or []:
                if isinstance(msg, dict) and isinstance(msg.get("content"), str):
                    yield msg["content"]
            for key in ("instruction", "input", "output", "prompt", "reference", "system"):
                if isinstance(row.get(key), str) and row[key]:
                    yield row[key]


def build_tokenizer(files: Iterable[Path], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on the text of ``files`` (JSONL)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = list(_texts(files))
    tok.train_from_iterator(texts + ["\n".join(SPECIAL_TOKENS)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    return fast


def build_demo_model(out: str | Path, seed: int = 0, data_files: Iterable[Path] | None = None,
                     hidden_size: int = 256, layers: int = 2, vocab_size: int = 1024) -> Path:
    """Build and save the tiny demo model and tokenizer into ``out``; returns the folder."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out = Path(out)
    if data_files is None:
        data_files = sorted((DEMO_DIR / "data").rglob("*.jsonl"))
    tokenizer = build_tokenizer(list(data_files), vocab_size=vocab_size)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=pad,
        eos_token_id=eos, pad_token_id=pad, dtype="float32")
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad,
                                               bos_token_id=pad, do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "remoteops_demo.json").write_text(json.dumps(
        {"kind": "remoteops demo model", "seed": seed, "hidden_size": hidden_size,
         "layers": layers, "vocab_size": len(tokenizer)}, indent=2) + "\n", encoding="utf-8")
    return out
