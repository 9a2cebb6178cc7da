"""The models the serve tests and the serving benchmark measure: a LoRA adapter made directly
with peft, and its GGUF made with llama.cpp's own converter and quantizer (no pytest here)."""

from __future__ import annotations

import shutil
from pathlib import Path


def make_adapter(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import torch

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(str(out))
    return out


def make_gguf(base: Path, adapter: Path, out_dir: Path, quant: str = "q4_k_m") -> Path:
    """Merge, convert to f16 and quantize, as the GGUF check does (the converter is cached)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from remoteops.quant.gguf_tools import convert, find_converter, quantize

    merged = out_dir / "merged"
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(merged)
    conv = find_converter({}, lambda m: None)
    f16 = out_dir / "model-f16.gguf"
    convert(merged, f16, "f16", conv["dir"], "qwen2", lambda m: None)
    path = out_dir / f"model-{quant}.gguf"
    quantize(f16, path, quant)
    f16.unlink()
    shutil.rmtree(merged)
    return path
