"""Serving speed: first-token latency and tokens/s of the adapter server and the GGUF server.

Both servers run as ``invoke serve`` runs them (``remoteops-agent serve-run``, a process of
its own on 127.0.0.1) and are measured with the laptop's own client (``laptop/chat``), so the
figures are what ``invoke chat`` sees, minus the SSH hop. Each answer is forced to exactly
``--tokens`` tokens (``min_tokens``), greedily, after one warm-up request.

  first token ms   from sending a streamed request to its first token arriving
  tokens/s         completion tokens / seconds of a whole non-streamed request
  streamed tok/s   streamed chunks after the first / seconds after the first (what a person
                   watching the answer sees; llama.cpp may merge a split character's tokens)

Without ``--model`` it builds the tiny demo model (random weights, CPU, seconds), a random
LoRA adapter and its GGUF. On a GPU machine give a real model folder::

  python tests/bench/bench_serve.py --model /models/Qwen3-8B --adapter outputs/adapter/adapter_all
  python tests/bench/bench_serve.py --model /models/Qwen3-8B --gguf outputs/quant/all/gguf/model-q4_k_m.gguf

Without ``--adapter`` a random LoRA (q_proj, v_proj, r 8) is made with peft; without
``--gguf`` the merged model is converted and quantized to ``--quant`` with llama.cpp's own
tools (as the GGUF check does; needs disk for an f16 copy). The adapter server uses CUDA
(bfloat16) when torch sees a GPU; the GGUF server offloads every layer when llama-cpp-python
was built with CUDA. ``--only adapter|gguf`` measures one. Also: ``invoke bench-serve``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

PROMPT = [{"role": "user", "content": "写一段关于学习的简短说明。Explain it in a few lines."}]


def build_inputs(work: Path, args) -> dict:
    """Base model, adapter and GGUF file to measure (made here when not given)."""
    from tests.serve.models import make_adapter, make_gguf

    base = Path(args.model) if args.model else None
    if base is None:
        from remoteops.trainer.demo_model import build_demo_model

        base = build_demo_model(work / "demo-model", seed=0)
    adapter = Path(args.adapter) if args.adapter else make_adapter(base, work / "adapter")
    gguf = None
    if args.only in (None, "gguf"):
        gguf = Path(args.gguf) if args.gguf else make_gguf(base, adapter, work / "gguf",
                                                            args.quant)
    return {"base": base, "adapter": adapter, "gguf": gguf}


def start_server(root: Path, port: int, spec: dict) -> subprocess.Popen:
    """``serve-run`` on ``port`` for ``spec``, as serve-start would spawn it; waits until ready."""
    from remoteops.common.files import write_atomic_json
    from remoteops.common.serving import log_path, state_path

    state_path(root, port).parent.mkdir(parents=True, exist_ok=True)
    write_atomic_json(state_path(root, port), {**spec, "port": port})
    log = open(log_path(root, port), "wb")
    # the server must import what this process imports (a GPU machine may carry newer
    # transformers/peft on PYTHONPATH): keep PYTHONPATH, put the repo first
    proc = subprocess.Popen([sys.executable, "-m", "remoteops.agent", "serve-run", "--root",
                             str(root), "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=root,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                [str(REPO), os.environ.get("PYTHONPATH", "")])))
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                spec["load_s"] = round(time.monotonic() - started, 2)
                # the server's own "ready on ... (device, ...)" line: where it really runs
                spec["ready"] = next((line for line in log_path(root, port).read_text(
                    errors="replace").splitlines() if line.startswith("ready on")), "")
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() - started > 1800:
                proc.kill()
                raise SystemExit(f"the server did not start: "
                                 f"{log_path(root, port).read_text()[-1500:]}")
            time.sleep(0.3)


def measure(url: str, model: str, tokens: int, repeats: int) -> dict:
    from remoteops.laptop.chat import complete

    complete(url, model, PROMPT, tokens, min_tokens=tokens)  # warm-up
    firsts, streamed, rates, counts = [], [], [], []
    for _ in range(repeats):
        res = complete(url, model, PROMPT, tokens, min_tokens=tokens)
        firsts.append(res["first_token_s"])
        streamed.append(res["tokens_per_s"] or 0.0)
        body = json.dumps({"model": model, "messages": PROMPT, "max_tokens": tokens,
                           "min_tokens": tokens, "temperature": 0, "seed": 0}).encode()
        req = urllib.request.Request(f"{url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=1800) as resp:
            usage = json.loads(resp.read())["usage"]
        took = time.perf_counter() - t0
        counts.append(int(usage["completion_tokens"]))
        rates.append(counts[-1] / took)
    return {"first_token_ms": round(statistics.median(firsts) * 1000, 1),
            "tokens_per_s": round(statistics.median(rates), 1),
            "stream_tokens_per_s": round(statistics.median(streamed), 1),
            "completion_tokens": counts[-1], "repeats": repeats}


def plain_generate(base: Path, adapter: Path, tokens: int, repeats: int) -> dict:
    """The baseline a user would otherwise write: transformers + peft ``generate`` in
    process (greedy, exactly ``tokens`` new tokens), on the same device and dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from remoteops.trainer.data import render
    from remoteops.trainer.train import load_tokenizer

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        str(base), dtype=torch.bfloat16 if cuda else torch.float32).to("cuda" if cuda else "cpu")
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    tok = load_tokenizer(base)
    ids = tok(render(tok, PROMPT, add_generation_prompt=True), add_special_tokens=False,
              return_tensors="pt")["input_ids"].to(model.device)
    rates = []
    for i in range(repeats + 1):  # the first is a warm-up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False)
        if cuda:
            torch.cuda.synchronize()
        if i:
            rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
    del model
    return {"tokens_per_s": round(statistics.median(rates), 1), "repeats": repeats}


def server_loop(base: Path, adapter: Path, tokens: int, repeats: int) -> dict:
    """The adapter server's own token loop (``ChatModel.generate``) called in this process,
    without HTTP or a thread: where the server's figure differs from plain ``generate``,
    this says whether the loop or the serving around it costs the difference."""
    import torch

    from remoteops.trainer.serve_adapter import ChatModel

    chat = ChatModel(base, adapter, "bench")
    ids = chat.prompt_ids(PROMPT)
    rates = []
    for i in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        n = sum(1 for _ in chat.generate(ids, tokens, 0.0, 1.0, min_tokens=tokens, seed=0))
        if chat.device == "cuda":
            torch.cuda.synchronize()
        if i:
            rates.append(n / (time.perf_counter() - t0))
    device = chat.device
    del chat
    return {"tokens_per_s": round(statistics.median(rates), 1), "device": device,
            "repeats": repeats}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"cpu: {os.cpu_count()} cores"


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        inputs = build_inputs(work, args)
        out = {"device": device(), "model": str(args.model or "tiny demo model (random)"),
               "tokens": args.tokens, "results": {}}
        plans = []
        if args.only in (None, "adapter"):
            plans.append(("adapter", {"format": "adapter", "stage": "bench",
                                      "model": str(inputs["adapter"]),
                                      "base_model": str(inputs["base"])}))
        if inputs["gguf"] is not None:
            plans.append((f"gguf:{args.quant}", {"format": f"gguf:{args.quant}", "stage": "bench",
                                                 "model": str(inputs["gguf"])}))
        for name, spec in plans:
            port = free_port()
            proc = start_server(work, port, spec)
            try:
                res = measure(f"http://127.0.0.1:{port}/v1", "bench", args.tokens, args.repeats)
            finally:
                proc.terminate()
                proc.wait(60)
            out["results"][name] = {"load_s": spec["load_s"], "ready": spec["ready"], **res}
        if "adapter" in out["results"]:
            plain = plain_generate(inputs["base"], inputs["adapter"], args.tokens, args.repeats)
            out["plain_generate"] = plain
            out["adapter_vs_plain"] = round(out["results"]["adapter"]["tokens_per_s"]
                                            / plain["tokens_per_s"], 3)
            out["server_loop"] = server_loop(inputs["base"], inputs["adapter"], args.tokens,
                                             args.repeats)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_serve.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face model folder (default: the tiny demo model)")
    p.add_argument("--adapter", help="a peft adapter folder for --model (default: a random LoRA)")
    p.add_argument("--gguf", help="a GGUF file to serve (default: convert the merged model)")
    p.add_argument("--quant", default="q4_k_m", help="GGUF type to make (default q4_k_m)")
    p.add_argument("--only", choices=["adapter", "gguf"], help="measure only one server")
    p.add_argument("--tokens", type=int, default=64, help="tokens per answer (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="requests per server (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return out
    print(f"serving speed on {out['device']}, {out['model']}, {out['tokens']} tokens per answer "
          "(median of the repeats)")
    print(f"{'server':<14}{'load s':>8}{'first token ms':>16}{'tokens/s':>10}"
          f"{'streamed tok/s':>16}")
    for name, r in out["results"].items():
        print(f"{name:<14}{r['load_s']:>8}{r['first_token_ms']:>16}{r['tokens_per_s']:>10}"
              f"{r['stream_tokens_per_s']:>16}")
    if "plain_generate" in out:
        print(f"plain transformers+peft generate (no server): "
              f"{out['plain_generate']['tokens_per_s']} tokens/s; adapter server / plain = "
              f"{out['adapter_vs_plain']}")
        print(f"the server's token loop in process (no HTTP): "
              f"{out['server_loop']['tokens_per_s']} tokens/s on {out['server_loop']['device']}")
    return out


if __name__ == "__main__":
    main()
