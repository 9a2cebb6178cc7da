"""bitsandbytes feasibility: can the stage's merged model be served in 8-bit or 4-bit nf4?

For each type it loads the merged model with bitsandbytes (on CUDA when there is
one, else on the CPU: bitsandbytes >= 0.45 has a CPU path) and reports: loaded
or the error, memory footprint, perplexity on the stage's eval set against the
unquantized merge (delta in %), a sample generation, tokens/s and the device.
Without bitsandbytes the check says ``skipped`` with the reason.

Settings, ``[plugins.quant_bnb]``: ``enabled``, ``stages``, ``types`` (default
``["int8", "nf4"]``; also ``fp4``), ``double_quant`` (default true),
``max_ppl_delta`` (default 0.05: above it, ``feasible with loss``),
``fail_ppl_delta`` (default 1.0: above it, ``not feasible``).
"""

from __future__ import annotations

import time

from remoteops.api import hookimpl
from remoteops.api import (NOT_FEASIBLE, missing_modules, overall_verdict, row_verdict,
                             skipped)

__version__ = "0.1.0"
TYPES = ("int8", "nf4", "fp4")


class BitsAndBytesCheck:
    name = "bnb"
    settings_key = "quant_bnb"

    def run(self, job) -> dict:
        opts = job.options(self.settings_key)
        missing = missing_modules(["bitsandbytes"])
        if missing:
            return skipped(self.name, f"bitsandbytes is not importable: {missing[0]}; install it "
                           "with pip install 'remoteops[quant]'")
        types = list(opts.get("types", ["int8", "nf4"]))
        unknown = [t for t in types if t not in TYPES]
        if unknown:
            return {"check": self.name, "verdict": NOT_FEASIBLE, "rows": [],
                    "reason": f"unknown type(s) {unknown} in plugins.quant_bnb.types; use "
                              f"{', '.join(TYPES)}"}
        import logging

        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        ref = job.reference()
        bound = float(opts.get("max_ppl_delta", 0.05))
        fail = float(opts.get("fail_ppl_delta", 1.0))
        # bitsandbytes logs, per layer and call, that 8-bit casts its inputs to float16.
        bnb_log = logging.getLogger("bitsandbytes")
        level = bnb_log.level
        bnb_log.setLevel(logging.ERROR)
        try:
            rows = [self._measure(job, t, device, ref, bool(opts.get("double_quant", True)),
                                  bound, fail) for t in types]
        finally:
            bnb_log.setLevel(level)
        verdict, reason = overall_verdict(rows)
        import bitsandbytes

        return {"check": self.name, "verdict": verdict, "reason": reason, "device": device,
                "bitsandbytes": getattr(bitsandbytes, "__version__", "?"),
                "reference": {"type": f"{ref['dtype']} merge", "ppl": ref["ppl"],
                              "memory_bytes": ref["memory_bytes"], "tokens": ref["tokens"]},
                "rows": rows}

    def _measure(self, job, kind, device, ref, double_quant, bound, fail) -> dict:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from remoteops.api import hf_generate_speed, hf_perplexity

        if kind == "int8":
            qconf = BitsAndBytesConfig(load_in_8bit=True)
        else:
            qconf = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                       bnb_4bit_use_double_quant=double_quant,
                                       bnb_4bit_compute_dtype=job.dtype())
        label = kind + (" (double quant)" if kind != "int8" and double_quant else "")
        row = {"type": kind, "label": label, "device": device, "load": False}
        started = time.time()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(job.merged()), quantization_config=qconf, dtype=job.dtype(),
                device_map=device)
        except Exception as exc:  # bitsandbytes raises many kinds on unsupported setups
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            row["verdict"], row["reason"] = NOT_FEASIBLE, f"load failed: {row['error']}"
            return row
        row["load"] = True
        row["load_s"] = round(time.time() - started, 2)
        row["memory_bytes"] = model.get_memory_footprint()
        row["size_bytes"] = row["memory_bytes"]
        row["memory_ratio"] = row["memory_bytes"] / ref["memory_bytes"] if ref["memory_bytes"] else None
        ppl, _ = hf_perplexity(model, job.token_ids())
        row["ppl"] = ppl
        row["ppl_delta"] = (ppl - ref["ppl"]) / ref["ppl"] if ppl and ref["ppl"] else None
        problems = []
        prompts = job.prompts()
        if prompts:
            try:
                text, speed = hf_generate_speed(model, job.tokenizer(), prompts[0], job.gen_tokens)
                row["sample"], row["tokens_per_s"] = text[:300], round(speed, 2)
            except Exception as exc:
                problems.append(f"generation failed: {type(exc).__name__}: {exc}"[:300])
        row["verdict"], row["reason"] = row_verdict(row["ppl_delta"], problems, bound, fail)
        del model
        return row


@hookimpl
def register_quant_checks(register):
    register("bnb", BitsAndBytesCheck())


@hookimpl
def report_sections(run_dir):
    from remoteops.api import quant_section

    table = quant_section(run_dir, "bnb")
    return [("Quantization: bitsandbytes", table)] if table else None
