#!/usr/bin/env bash
# What only a CUDA GPU can show, in one run (about 5 minutes on one H100):
#   1. QLoRA with bitsandbytes: our trainer against a plain HF 4-bit run (tokens/s), and the
#      real `remoteops-agent train` with quantization = "qlora" end to end;
#   2. the PyTorch Lightning health callback under 32, bf16-mixed and 16-mixed precision;
#   3. the adapter chat server's first-token latency and tokens/s on the GPU, against plain
#      generate and its own token loop in process; that loop in the main thread against
#      another one, and a profile of it (serve.log);
#   4. the torchrun executor on CUDA (tests/executors/test_torchrun_cuda.py: one rank per
#      visible GPU, NCCL between them, a NaN drill); needs pytest (a wheel in .whl/ will do).
# Run from the repository root on the GPU machine. Wheels the machine lacks may sit in
# .whl/ (bitsandbytes, and the transformers/peft of constraints.txt); they are installed
# into /tmp/site first. Results go to $OUT (default /tmp/gpu-check).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import sys, torch, transformers, peft; print("python", sys.version.split()[0],
"torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
    python3 -c 'import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)'
} 2>&1 | tee "$OUT/env.txt"

# SKIP_QLORA=1, SKIP_LIGHTNING=1, SKIP_SERVE=1, SKIP_TORCHRUN=1 skip a part.
[ -n "${SKIP_QLORA:-}" ] || {
echo "== 1. QLoRA: ours against plain HF 4-bit"
timeout 300 python3 -m tests.bench.bench_qlora --end-to-end --json "$OUT/qlora.json" \
    >"$OUT/qlora.log" 2>&1
echo "exit $?" >>"$OUT/qlora.log"
grep -E '^(model|bench-qlora|end to end)|exit' "$OUT/qlora.log"
}

[ -n "${SKIP_LIGHTNING:-}" ] || {
echo "== 2. Lightning callback on CUDA"
timeout 120 python3 tests/bench/gpu_lightning.py >"$OUT/lightning.log" 2>&1
echo "exit $?" >>"$OUT/lightning.log"
grep -E '^\{|exit' "$OUT/lightning.log"
}

[ -n "${SKIP_SERVE:-}" ] || {
echo "== 3. adapter chat server on CUDA"
timeout 300 python3 - "$OUT" <<'EOF' >"$OUT/serve.log" 2>&1
import cProfile, pstats, subprocess, sys
from pathlib import Path
from remoteops.trainer.demo_model import build_demo_model
from tests.serve.models import make_adapter
out = Path(sys.argv[1])
model = build_demo_model(Path("/tmp/serve-model"), seed=0, hidden_size=2048, layers=16)
with open(out / "serve.json", "w") as fh:
    code = subprocess.call([sys.executable, "tests/bench/bench_serve.py", "--model", str(model),
                            "--only", "adapter", "--tokens", "32", "--repeats", "2", "--json"],
                           stdout=fh)
# where the server's token loop spends its time on this GPU (32 tokens, after a warm-up)
from remoteops.trainer.serve_adapter import ChatModel
chat = ChatModel(model, make_adapter(model, Path("/tmp/serve-adapter")), "probe")
ids = chat.prompt_ids([{"role": "user", "content": "Explain it in a few lines."}])
list(chat.generate(ids, 8, 0.0, 1.0, min_tokens=8))
import threading, time
def rate(box):  # tokens/s of 32 tokens of the loop, as the server runs it
    t0 = time.perf_counter()
    n = len(list(chat.generate(ids, 32, 0.0, 1.0, min_tokens=32)))
    box.append(round(n / (time.perf_counter() - t0), 1))
main, thread = [], []
for _ in range(2):
    rate(main)
    t = threading.Thread(target=rate, args=(thread,))
    t.start(); t.join()
print(f"loop tokens/s: main thread {main}, another thread (as the server) {thread}")
prof = cProfile.Profile()
prof.enable()
list(chat.generate(ids, 32, 0.0, 1.0, min_tokens=32))
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(25)
pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
sys.exit(code)
EOF
echo "exit $?" >>"$OUT/serve.log"
grep -E "exit|function calls|loop tokens" "$OUT/serve.log"; cat "$OUT/serve.json"
}

[ -n "${SKIP_TORCHRUN:-}" ] || {
echo "== 4. torchrun executor on CUDA"
timeout 600 python3 -m pytest -q -p no:cacheprovider -rs tests/executors/test_torchrun_cuda.py \
    >"$OUT/torchrun.log" 2>&1
echo "exit $?" >>"$OUT/torchrun.log"
tail -5 "$OUT/torchrun.log"
}
