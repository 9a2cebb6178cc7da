"""What a quantization check works on: the stage's merged model, eval texts and HF reference.

A :class:`QuantJob` is built once per stage and shared by every check of that
stage, so the adapter is merged once and the unquantized reference
(perplexity, logits) is measured once. Paths: the merged model and the
quantized files go under ``outputs/quant/<stage>/`` of the project (large
files stay out of the run directory, which ``collect`` copies back).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


def perplexity_from_logits(logits, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood and token count of ``ids`` under ``logits`` (numpy, n x vocab)."""
    import numpy as np

    x = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    target = np.asarray(ids[1:])
    nll = float(-logp[np.arange(len(target)), target].sum())
    return nll, len(target)


@dataclass
class QuantJob:
    """One stage's inputs for the checks; heavy things are computed lazily and cached."""

    stage: str
    project_dir: Path
    run_dir: Path
    base_model: Path
    adapter: Path | None
    eval_set: Path | None
    settings: Any = None
    live_dest: Path | None = None  # a live stage's dataset folder: its samples stand in
    out_dir: Path | None = None
    max_items: int = 8
    max_seq_len: int = 256
    gen_tokens: int = 32
    log: Callable[[str], None] = print
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_stage(cls, settings, stage: str, run_dir: Path, log: Callable[[str], None] = print,
                  adapter: Path | None = None) -> "QuantJob":
        """The job for a configured stage: its base model, adapter and eval set."""
        from remoteops.trainer.stageconf import resolve_stage

        cfg = resolve_stage(settings, stage)
        common = settings.get("plugins.quant") or {}
        out = Path(common.get("out_dir", "outputs/quant"))
        out = (out if out.is_absolute() else cfg.project_dir / out) / stage
        return cls(stage=stage, project_dir=cfg.project_dir, run_dir=Path(run_dir),
                   base_model=cfg.base_model, adapter=Path(adapter or cfg.adapter_dir),
                   eval_set=cfg.eval_set or cfg.dataset, settings=settings, out_dir=out,
                   live_dest=Path(cfg.live["dest"]) if cfg.live else None,
                   max_items=int(common.get("max_eval_items", 8)),
                   max_seq_len=min(int(cfg.train["max_seq_len"]), 512),
                   gen_tokens=int(common.get("gen_tokens", 32)), log=log)

    def options(self, key: str) -> dict:
        """The ``[plugins.<key>]`` table (empty when absent)."""
        getter = getattr(self.settings, "get", None)
        return dict((getter(f"plugins.{key}") if getter else None) or {})

    def problem(self) -> str | None:
        """Why no check can run (missing base model or adapter), else None."""
        if not (self.base_model / "config.json").is_file():
            return f"base model {self.base_model} not found; set train.base_model"
        if self.adapter is not None and not (self.adapter / "adapter_config.json").is_file():
            return (f"no adapter at {self.adapter}; train the stage first "
                    f"('remoteops-agent train --stage {self.stage}')")
        return None

    # -- text -----------------------------------------------------------------------
    def tokenizer(self):
        if "tok" not in self._cache:
            from remoteops.trainer.train import load_tokenizer, quiet_transformers

            quiet_transformers()

            self._cache["tok"] = load_tokenizer(self.base_model)
        return self._cache["tok"]

    def _records(self) -> list[dict]:
        if "records" not in self._cache:
            from remoteops.trainer.data import read_jsonl

            rows = []
            for rec in self._eval_records(read_jsonl)[: self.max_items]:
                msgs = rec.messages
                ref = rec.extra.get("reference")
                if ref is None and msgs and msgs[-1]["role"] == "assistant":
                    ref, msgs = msgs[-1]["content"], msgs[:-1]
                rows.append({"messages": msgs, "reference": ref})
            self._cache["records"] = rows
        return self._cache["records"]

    def _eval_records(self, read_jsonl) -> list:
        """The eval set's records; for a live stage without one, the live set's samples in
        the order they arrived."""
        if self.eval_set is not None and Path(self.eval_set).is_file():
            return read_jsonl(self.eval_set, max_bad_lines=10**6, kind="eval").records
        if self.live_dest is None:
            return []
        from remoteops.common.live_set import LiveSet
        from remoteops.trainer.live_data import sample_records

        live, records = LiveSet(self.live_dest), []
        for entry in live.entries():
            records += sample_records(live.path_of(entry), entry["path"])[0]
            if len(records) >= self.max_items:
                break
        return records

    def prompts(self) -> list[str]:
        """The eval prompts rendered with the chat template, ready for generation."""
        from remoteops.trainer.data import render

        return [render(self.tokenizer(), r["messages"], add_generation_prompt=True)
                for r in self._records()]

    def texts(self) -> list[str]:
        """Prompt plus reference answer per eval item, rendered (what perplexity is measured on)."""
        from remoteops.trainer.data import render

        out = []
        for r in self._records():
            msgs = r["messages"] + ([{"role": "assistant", "content": r["reference"]}]
                                    if r["reference"] else [])
            out.append(render(self.tokenizer(), msgs))
        return out

    def token_ids(self) -> list[list[int]]:
        """HF token ids of :meth:`texts` (no special tokens added, cut to max_seq_len)."""
        if "ids" not in self._cache:
            tok = self.tokenizer()
            ids = [tok(t, add_special_tokens=False)["input_ids"][: self.max_seq_len]
                   for t in self.texts()]
            self._cache["ids"] = [i for i in ids if len(i) >= 2]
        return self._cache["ids"]

    # -- models ---------------------------------------------------------------------
    def dtype(self):
        """The merge's dtype: ``[plugins.quant] merge_dtype``, else the base model's own
        (bfloat16 for a real 8B model, so the merge takes 16 GB, not 32), else float32."""
        import json as _json

        import torch

        name = str(self.options("quant").get("merge_dtype", "auto"))
        if name == "auto":
            try:
                cfg = _json.loads((self.base_model / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                cfg = {}
            name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"plugins.quant.merge_dtype = {name!r}; use auto, float32, bfloat16 "
                             "or float16")
        return dtype

    def merged(self) -> Path:
        """The adapter merged into the base model and saved (once per job)."""
        if "merged" in self._cache:
            return self._cache["merged"]
        if self.adapter is None:
            self._cache["merged"] = self.base_model
            return self.base_model
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        import warnings

        out = Path(self.out_dir or self.project_dir / "outputs" / "quant" / self.stage) / "merged"
        started = time.time()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = AutoModelForCausalLM.from_pretrained(str(self.base_model), dtype=self.dtype())
        model = PeftModel.from_pretrained(model, str(self.adapter)).merge_and_unload()
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        model.save_pretrained(out)
        self.tokenizer().save_pretrained(out)
        for name in ("generation_config.json",):
            if (self.base_model / name).is_file() and not (out / name).exists():
                shutil.copy2(self.base_model / name, out / name)
        self.log(f"merged adapter {self.adapter} into {self.base_model} -> {out} "
                 f"({time.time() - started:.1f}s)")
        self._cache["merged"] = out
        return out

    def load_reference(self):
        """The unquantized merged model (in the merge's dtype; on CUDA when available)."""
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(self.merged()), dtype=self.dtype())
        if torch.cuda.is_available():
            model = model.to("cuda")
        return model.eval()

    def reference(self) -> dict:
        """Perplexity and first-text logits of the unquantized merge (computed once)."""
        if "reference" not in self._cache:
            model = self.load_reference()
            ppl, n = hf_perplexity(model, self.token_ids())
            logits = hf_logits(model, self.token_ids()[0]) if self.token_ids() else None
            self._cache["reference"] = {"ppl": ppl, "tokens": n, "logits0": logits,
                                        "dtype": str(self.dtype()).replace("torch.", ""),
                                        "memory_bytes": model.get_memory_footprint(),
                                        "device": str(next(model.parameters()).device)}
            del model
        return self._cache["reference"]

    def cleanup(self) -> None:
        """Remove the merged model unless ``[plugins.quant] keep_merged = true``."""
        merged = self._cache.get("merged")
        if merged and merged != self.base_model and not self.options("quant").get("keep_merged"):
            shutil.rmtree(merged, ignore_errors=True)


def hf_logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        x = torch.tensor([ids], device=next(model.parameters()).device)
        return model(input_ids=x).logits[0].float().cpu().numpy()


def hf_perplexity(model, ids_list: list[list[int]]) -> tuple[float | None, int]:
    """Token-level perplexity of a HF causal LM over ``ids_list`` and the token count."""
    total, count = 0.0, 0
    for ids in ids_list:
        nll, n = perplexity_from_logits(hf_logits(model, ids), ids)
        total, count = total + nll, count + n
    return (math.exp(total / count) if count else None), count


def hf_generate_speed(model, tokenizer, prompt: str, n_tokens: int) -> tuple[str, float]:
    """Greedy-generate ``n_tokens`` (EOS not honoured, so the count is fixed); text and tokens/s."""
    import torch

    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(
        next(model.parameters()).device)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    took = time.perf_counter() - started
    new = out[0, enc["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), len(new) / took if took > 0 else 0.0
