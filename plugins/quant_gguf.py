"""GGUF feasibility: can the stage's merged model be served on a CPU with llama.cpp?

Merges the adapter, converts with llama.cpp's own ``convert_hf_to_gguf.py``,
quantizes with llama.cpp, loads each file with llama-cpp-python and reports per
type: file size, load ok, token parity with the HF tokenizer on the eval texts,
for f16 logit parity with the HF model (max abs difference, top-1 agreement),
perplexity delta against the HF model on the eval set, and generation tokens/s.

A tokenizer whose pre-tokenizer the converter does not recognise (every locally
trained byte-level BPE) is handled explicitly: set ``pre_tokenizer`` to the
llama.cpp name it behaves like (used only when the converter's own detection
fails); token parity then proves (or refutes) the choice. Under ``auto`` such
a tokenizer ends in ``not feasible`` with that advice.

Settings, ``[plugins.quant_gguf]``: ``enabled``, ``stages``, ``types`` (default
``["f16", "q8_0", "q4_k_m"]``), ``pre_tokenizer`` (default ``auto``),
``llama_cpp_dir`` (a llama.cpp checkout; default: the llama-cpp-python source
distribution, fetched once into the user cache), ``cache_dir``,
``max_ppl_delta`` (0.05), ``fail_ppl_delta`` (1.0), ``max_logit_diff`` (f16
logits further than this from the HF model's fail: 0.01), ``keep_files``
(default true: the .gguf files stay in ``outputs/quant/<stage>/gguf``).
"""

from __future__ import annotations

import shutil

from remoteops.api import hookimpl
from remoteops.api import NOT_FEASIBLE, missing_modules, overall_verdict, row_verdict, skipped

__version__ = "0.1.0"
DEFAULT_TYPES = ["f16", "q8_0", "q4_k_m"]


class GgufCheck:
    name = "gguf"
    settings_key = "quant_gguf"

    def run(self, job) -> dict:
        from remoteops.api import GgufError

        opts = job.options(self.settings_key)
        missing = missing_modules(["llama_cpp", "gguf", "sentencepiece"])
        if missing:
            return skipped(self.name, f"not importable: {', '.join(missing)}; install them with "
                           "pip install 'remoteops[quant]' (llama-cpp-python builds from source, "
                           "~8 min once)")
        result = {"check": self.name, "rows": [], "notes": []}
        try:
            self._run(job, opts, result)
        except GgufError as exc:
            result.update(verdict=NOT_FEASIBLE, reason=str(exc))
        return result

    def _run(self, job, opts, result) -> None:
        import llama_cpp

        from remoteops.api import CONVERTER_TYPES, convert, find_converter, quantize

        types = [str(t).lower() for t in opts.get("types", DEFAULT_TYPES)]
        bound = float(opts.get("max_ppl_delta", 0.05))
        fail = float(opts.get("fail_ppl_delta", 1.0))
        max_logit = float(opts.get("max_logit_diff", 0.01))
        conv = find_converter(opts, job.log)
        result["converter"] = conv
        result["notes"].append(conv["note"])
        result["llama_cpp_python"] = getattr(llama_cpp, "__version__", "?")
        out_dir = job.out_dir / "gguf"
        out_dir.mkdir(parents=True, exist_ok=True)
        merged = job.merged()
        f16 = out_dir / "model-f16.gguf"
        info = convert(merged, f16, "f16", conv["dir"], str(opts.get("pre_tokenizer", "auto")),
                       job.log)
        result["pre_tokenizer"] = info["pre_tokenizer"]
        result["pre_tokenizer_source"] = info["pre_tokenizer_source"]
        result["notes"].append(f"pre-tokenizer {info['pre_tokenizer']} "
                               f"({info['pre_tokenizer_source']})")
        ref = job.reference()
        result["reference"] = {"type": f"HF {ref['dtype']} merge", "ppl": ref["ppl"],
                               "tokens": ref["tokens"]}
        ids, texts = job.token_ids(), job.texts()
        tok = job.tokenizer()
        prompts = job.prompts()
        prompt_ids = tok(prompts[0], add_special_tokens=False)["input_ids"] if prompts else None
        n_ctx = max([len(i) for i in ids] + [len(prompt_ids or []) + job.gen_tokens, 64]) + 8
        for qtype in types:
            path = out_dir / f"model-{qtype}.gguf"
            row = {"type": qtype, "file": str(path)}
            try:
                if qtype == "f16":
                    pass
                elif qtype in CONVERTER_TYPES and qtype != "q8_0":
                    convert(merged, path, qtype, conv["dir"], str(opts.get("pre_tokenizer", "auto")),
                            job.log)
                else:
                    quantize(f16, path, qtype)
            except Exception as exc:
                row.update(load=False, verdict=NOT_FEASIBLE, reason=f"{type(exc).__name__}: {exc}")
                result["rows"].append(row)
                continue
            row["size_bytes"] = path.stat().st_size
            m = _measure(path, ids, texts, prompt_ids, ref["logits0"], job.gen_tokens, n_ctx)
            row.update(m)
            problems = []
            if not m["load"]:
                hint = ("; set plugins.quant_gguf.pre_tokenizer to a name llama.cpp knows (e.g. "
                        "qwen2, llama-bpe)" if "pre-tokenizer" in str(m.get("error")) else "")
                problems.append(f"llama-cpp-python could not load it: {m.get('error')}{hint}")
            else:
                if not m.get("token_parity"):
                    problems.append("token ids differ from the HF tokenizer (e.g. on "
                                    f"{m.get('token_mismatch_example')!r}); the pre-tokenizer "
                                    "is wrong: set plugins.quant_gguf.pre_tokenizer")
                if qtype in ("f16", "f32") and m.get("logit_max_abs_diff") is not None \
                        and m["logit_max_abs_diff"] > max_logit:
                    problems.append(f"f16 logits differ from HF by {m['logit_max_abs_diff']:.2e} "
                                    f"(> {max_logit:g})")
            if m.get("ppl") and ref["ppl"]:
                row["ppl_delta"] = (m["ppl"] - ref["ppl"]) / ref["ppl"]
            else:
                row["ppl_delta"] = None
            row["verdict"], row["reason"] = row_verdict(row["ppl_delta"], problems, bound, fail)
            result["rows"].append(row)
        if not opts.get("keep_files", True):
            shutil.rmtree(out_dir, ignore_errors=True)
        result["verdict"], result["reason"] = overall_verdict(result["rows"])


def _measure(*args):
    from remoteops.api import measure

    return measure(*args)


@hookimpl
def register_quant_checks(register):
    register("gguf", GgufCheck())


@hookimpl
def report_sections(run_dir):
    from remoteops.api import quant_section

    table = quant_section(run_dir, "gguf")
    return [("Quantization: GGUF (llama.cpp)", table)] if table else None
