"""Run llama.cpp's ``convert_hf_to_gguf.py`` with an explicit pre-tokenizer (a subprocess entry).

Usage: ``python -m remoteops.quant._convert_main LLAMA_CPP_DIR PRE_TOKENIZER -- CONVERTER ARGS``.
``PRE_TOKENIZER`` is ``auto`` (the converter's own detection) or a llama.cpp
pre-tokenizer name (``qwen2``, ``llama-bpe``...) used when the converter does
not recognise the tokenizer. An unrecognised tokenizer under ``auto`` prints
one line ``REMOTEOPS_PRE_TOKENIZER_UNKNOWN <chkhsh>`` and exits 3.
"""

from __future__ import annotations

import hashlib
import logging
import runpy
import sys
from pathlib import Path

EXIT_UNKNOWN_PRE = 3


def main(argv: list[str]) -> int:
    llama_dir, pre, sep, *rest = argv
    assert sep == "--", "usage: LLAMA_CPP_DIR PRE_TOKENIZER -- ARGS"
    script = Path(llama_dir) / "convert_hf_to_gguf.py"
    sys.path.insert(0, str(Path(llama_dir)))
    sys.path.insert(1, str(Path(llama_dir) / "gguf-py"))
    import conversion.base as base  # the converter's own package, from the path above

    original = base.TextModel.get_vocab_base_pre
    seen: dict[str, str] = {}

    def get_vocab_base_pre(self, tokenizer) -> str:
        # Silence the converter's banner: we say it in one line ourselves.
        quiet = logging.getLogger("hf-to-gguf")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            res = original(self, tokenizer)
            seen["detected"] = res
            return res
        except NotImplementedError:
            digest = _chkhsh(original, tokenizer)
            if pre == "auto":
                print(f"REMOTEOPS_PRE_TOKENIZER_UNKNOWN {digest}", flush=True)
                raise SystemExit(EXIT_UNKNOWN_PRE) from None
            print(f"REMOTEOPS_PRE_TOKENIZER_FORCED {pre} {digest}", flush=True)
            return pre
        finally:
            quiet.setLevel(level)

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    if "detected" in seen:
        print(f"REMOTEOPS_PRE_TOKENIZER_DETECTED {seen['detected']}", flush=True)
    return 0


def _chkhsh(original, tokenizer) -> str:
    import inspect

    # The converter hashes the token ids of a fixed probe text; reuse its text.
    src = inspect.getsource(original)
    start = src.index("chktxt = ") + len("chktxt = ")
    text = eval(src[start:src.index("\n", start)])  # a string literal from the converter
    return hashlib.sha256(str(tokenizer.encode(text)).encode()).hexdigest()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
