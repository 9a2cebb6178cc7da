"""llama.cpp's own tools for the GGUF check: find the converter, convert, quantize, measure.

``convert_hf_to_gguf.py`` ships in no wheel. It is taken from, in order: the
configured llama.cpp checkout (``[plugins.quant_gguf] llama_cpp_dir``), the
cache (``<user cache>/remoteops/llama.cpp/<llama-cpp-python version>/``), or
the llama-cpp-python source distribution fetched with ``pip download`` (the
same version as installed, so converter and loader agree) and unpacked into
that cache: only the converter, its ``conversion`` package and ``gguf-py``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from remoteops.common.files import user_cache_dir

CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # the converter writes these itself
EXIT_UNKNOWN_PRE = 3


class GgufError(Exception):
    """A step of the GGUF check failed; the message says what to do."""


def llama_cpp_python_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def find_converter(opts: dict, log: Callable[[str], None]) -> dict[str, str]:
    """``{"dir", "source", "note"}`` of a llama.cpp tree holding the converter (fetches it if need be)."""
    configured = opts.get("llama_cpp_dir")
    if configured:
        path = Path(configured).expanduser()
        if not (path / CONVERTER).is_file():
            raise GgufError(f"plugins.quant_gguf.llama_cpp_dir = {configured} holds no {CONVERTER}; "
                            "point it at a llama.cpp checkout, or remove it to use the "
                            "llama-cpp-python source distribution.")
        return {"dir": str(path), "source": "configured", "note": f"converter from {path}"}
    version = llama_cpp_python_version()
    cache = Path(opts.get("cache_dir") or user_cache_dir() / "llama.cpp").expanduser()
    tree = cache / f"llama-cpp-python-{version}"
    if (tree / CONVERTER).is_file():
        return {"dir": str(tree), "source": "cache", "note": f"converter from the cache {tree}"}
    log(f"{CONVERTER} is in no wheel: fetching the llama-cpp-python {version} source "
        f"distribution with pip into {cache} (once)")
    started = time.time()
    fetch_converter(version, tree)
    note = (f"fetched llama-cpp-python=={version} sdist with pip download and unpacked "
            f"{CONVERTER}, conversion/ and gguf-py/ into {tree} ({time.time() - started:.0f}s)")
    log(note)
    return {"dir": str(tree), "source": "download", "note": note}


def fetch_converter(version: str, tree: Path) -> None:
    """pip-download the sdist and unpack the converter's files into ``tree`` (atomically)."""
    tree.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tree.parent, prefix=".fetch-") as tmp:
        # pip prepares the sdist's metadata too (its build backend in an isolated env):
        # about a minute, once per llama-cpp-python version.
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               f"llama-cpp-python=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise GgufError(f"could not download the llama-cpp-python {version} source "
                            f"distribution ({(proc.stderr or proc.stdout).strip()[-300:]}); "
                            "set plugins.quant_gguf.llama_cpp_dir to a llama.cpp checkout.")
        staging = Path(tmp) / "tree"
        _extract_converter(sdists[0], staging)
        if tree.exists():
            shutil.rmtree(tree)
        os.replace(staging, tree)


def _extract_converter(sdist: Path, dest: Path) -> None:
    wanted = re.compile(r"^[^/]+/vendor/llama\.cpp/(convert_hf_to_gguf\.py|conversion/.+|"
                        r"gguf-py/gguf/.+|LICENSE)$")
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not wanted.match(m.name) or not m.isfile():
                continue
            rel = m.name.split("/vendor/llama.cpp/", 1)[1]
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise GgufError(f"unsafe path {m.name} in {sdist.name}; not unpacking it.")
            members.append((m, rel))
        if not any(rel == CONVERTER for _, rel in members):
            raise GgufError(f"{sdist.name} holds no vendor/llama.cpp/{CONVERTER}; set "
                            "plugins.quant_gguf.llama_cpp_dir to a llama.cpp checkout.")
        for m, rel in members:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            target.write_bytes(src.read())


def convert(model_dir: Path, out: Path, outtype: str, llama_dir: str, pre_tokenizer: str,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Run the converter (in a subprocess) with the pre-tokenizer policy; ``{"pre_tokenizer", ...}``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "remoteops.quant._convert_main", llama_dir, pre_tokenizer or "auto",
           "--", str(model_dir), "--outfile", str(out), "--outtype", outtype]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2])] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    text = proc.stdout + proc.stderr
    if proc.returncode == EXIT_UNKNOWN_PRE:
        digest = re.search(r"REMOTEOPS_PRE_TOKENIZER_UNKNOWN (\w+)", text)
        raise GgufError(
            "llama.cpp's converter does not recognise this tokenizer's pre-tokenizer (chkhsh "
            f"{digest.group(1) if digest else '?'}); set [plugins.quant_gguf] pre_tokenizer to the "
            "llama.cpp name of the pre-tokenizer it was built like (e.g. \"qwen2\" for a Qwen-style "
            "byte-level BPE, \"llama-bpe\" for Llama 3); token parity is then checked.")
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join(text.strip().splitlines()[-6:])
        raise GgufError(f"{CONVERTER} failed (exit {proc.returncode}): {tail[-600:]}")
    forced = re.search(r"REMOTEOPS_PRE_TOKENIZER_FORCED (\S+)", text)
    detected = re.search(r"REMOTEOPS_PRE_TOKENIZER_DETECTED (\S+)", text)
    info = {"pre_tokenizer": forced.group(1) if forced else (detected.group(1) if detected else None),
            "pre_tokenizer_source": "configured (not recognised by the converter)" if forced
            else "detected by the converter", "convert_s": round(time.time() - started, 2),
            "command": " ".join(cmd[2:])}
    log(f"converted {model_dir} -> {out} ({outtype}, pre-tokenizer {info['pre_tokenizer']}, "
        f"{info['pre_tokenizer_source']}, {info['convert_s']}s)")
    return info


def quantize(src: Path, dst: Path, qtype: str) -> None:
    """Quantize a GGUF file with llama.cpp (``llama_model_quantize``)."""
    import llama_cpp

    const = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if const is None:
        known = sorted(n[len("LLAMA_FTYPE_MOSTLY_"):].lower() for n in dir(llama_cpp)
                       if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise GgufError(f"unknown GGUF type '{qtype}'; llama.cpp knows {', '.join(known)}.")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = const
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise GgufError(f"llama.cpp could not quantize {src.name} to {qtype} (return code {rc}); "
                        "k-quants need tensor rows divisible by 256.")


def load_diagnosis(path: Path) -> str:
    """Why llama.cpp refuses ``path``: its verbose log's error lines (it says nothing without them)."""
    code = ("import sys\nfrom llama_cpp import Llama\n"
            "try:\n    Llama(model_path=sys.argv[1], verbose=True).close()\n"
            "except Exception:\n    pass\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          timeout=300)
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines()
             if re.search(r"\berror\b|\bfailed\b|\binvalid\b", ln, re.I)]
    return " | ".join(dict.fromkeys(lines))[-600:] or "no reason in llama.cpp's log"


def compare_logits(mine, reference) -> dict[str, Any]:
    """Agreement of two implementations' logits (n x vocab), judged by what float noise explains.

    Two independent float implementations (llama.cpp, transformers) may pick different
    top-1 tokens where the reference's top-1/top-2 margin is a near-tie. A flip counts as
    explained only where that margin is smaller than the measured max abs logit difference
    ``d``; ``top1_unexplained`` counts the others, which point at a broken conversion
    rather than at rounding. (A flip needs the two logits' errors to differ by at least the
    margin; a margin above ``d`` needs both errors near their extreme, in opposite
    directions, at the same position.)
    """
    import numpy as np

    mine = np.asarray(mine, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    d = float(np.abs(mine - ref).max()) if ref.size else 0.0
    flipped = mine.argmax(1) != ref.argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    return {"logit_max_abs_diff": d,
            "top1_agreement": float((~flipped).mean()) if len(ref) else 1.0,
            "top1_flips": int(flipped.sum()),
            "top1_unexplained": int((flipped & (margin >= d)).sum())}


def measure(path: Path, ids_list: list[list[int]], texts: list[str], prompt_ids: list[int] | None,
            ref_logits, gen_tokens: int, n_ctx: int) -> dict[str, Any]:
    """Load ``path`` with llama-cpp-python; token parity, logits, perplexity and tokens/s."""
    import math

    import numpy as np
    from llama_cpp import Llama

    from remoteops.quant.job import perplexity_from_logits

    out: dict[str, Any] = {"load": False}
    try:
        llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                    n_threads=os.cpu_count() or 1, seed=0)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}: {load_diagnosis(path)}"
        return out
    try:
        out["load"] = True
        mismatches = []
        for text, ids in zip(texts, ids_list):
            mine = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)[: len(ids)]
            if list(mine) != list(ids):
                mismatches.append(text[:60])
        out["token_parity"] = not mismatches
        out["token_parity_checked"] = len(ids_list)
        if mismatches:
            out["token_mismatch_example"] = mismatches[0]
        total, count = 0.0, 0
        for i, ids in enumerate(ids_list):
            llm.reset()
            llm.eval(ids)
            logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
            if i == 0 and ref_logits is not None:
                out.update(compare_logits(logits, ref_logits[: len(ids)]))
            nll, n = perplexity_from_logits(logits, ids)
            total, count = total + nll, count + n
        out["ppl"] = math.exp(total / count) if count else None
        if prompt_ids:
            llm.reset()
            produced = []
            started = time.perf_counter()
            for tok in llm.generate(prompt_ids, temp=0.0, reset=True):
                produced.append(tok)
                if len(produced) >= gen_tokens:
                    break
            took = time.perf_counter() - started
            out["tokens_per_s"] = round(len(produced) / took, 2) if took > 0 else None
            out["sample"] = llm.detokenize(produced).decode("utf-8", "replace")[:300]
    finally:
        llm.close()
    return out
