"""A small OpenAI-compatible chat server for a base model plus a LoRA adapter (transformers
+ peft), on the standard library's ``ThreadingHTTPServer``.

Routes: ``GET /health``, ``GET /v1/models`` (the stage's name, and ``base``: the same model
with the adapter switched off, for side-by-side answers), ``POST /v1/chat/completions``
(``messages``, ``model``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stream``,
and ``min_tokens`` as llama-cpp-python's server takes it). One request generates at a time
(a lock): a model is not safe to share between threads, and one GPU gains nothing from it.
Tokens are generated one by one with the KV cache, so a streamed chunk is one token.

The model runs in the process's main thread, the one that loaded it; the HTTP threads hand
it their requests (``MainThreadModel``). On an H100 the same token loop ran at 16 tokens/s in
another thread and 52 in the main one (a 432 M model, bf16): served from the request's own
thread, as before, the server gave 14.7 tokens/s; from the main thread, 35.6.

Binds the address it is given (the agent gives 127.0.0.1 only). SIGTERM ends it.
"""

from __future__ import annotations

import inspect
import json
import queue
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

BASE_ID = "base"  # as remoteops.common.serving.BASE_MODEL_ID (trainer imports no common side)


class ChatModel:
    """The base model with the adapter loaded; ``generate`` yields token texts."""

    def __init__(self, base: Path, adapter: Path | None, name: str):
        import torch
        from transformers import AutoModelForCausalLM

        from remoteops.trainer.train import load_tokenizer, quiet_transformers

        quiet_transformers()
        self.name = name
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.tokenizer = load_tokenizer(base)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).to(self.device)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        self.model = model.eval()
        self.has_adapter = adapter is not None
        # the transformers model itself (the LoRA layers are in it), as peft's generate calls it
        self.lm = model.get_base_model() if adapter is not None else model
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {e for e in eos + [self.tokenizer.eos_token_id] if e is not None}
        self.eos_ids = torch.tensor(sorted(self.eos), device=self.device)  # masked below min_tokens
        self.lock = threading.Lock()
        # transformers 5.24 renamed past_key_values to cache (the old name still works, warning)
        params = inspect.signature(self.lm.forward).parameters
        self.step_args: dict[str, Any] = {"use_cache": True}
        if "logits_to_keep" in params:  # as generate: no logits for the prompt's other positions
            self.step_args["logits_to_keep"] = 1
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def model_ids(self) -> list[str]:
        return [self.name, BASE_ID] if self.has_adapter else [self.name]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        from remoteops.trainer.data import render

        text = render(self.tokenizer, messages, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, ids: list[int], max_tokens: int, temperature: float, top_p: float,
                 min_tokens: int = 0, use_base: bool = False, seed: int | None = None,
                 stats: dict | None = None) -> Iterator[str]:
        """Yield the text each new token adds ("" while it ends in an incomplete character).

        Per step as transformers' own ``generate`` does: one new token in, the cache built from
        the model's config, only the last position's logits, the EOS mask a device tensor, and
        one device sync per token (reading the chosen token); the text decoded incrementally."""
        import contextlib

        import torch
        from transformers import DynamicCache

        gen = torch.Generator()  # sampling happens on the CPU (one small vector per token)
        gen.manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))
        off = self.model.disable_adapter() if use_base and self.has_adapter \
            else contextlib.nullcontext()
        with self.lock, off, torch.inference_mode():
            cache = DynamicCache(config=self.lm.config)  # filled in place, step by step
            args = {**self.step_args, self.cache_arg: cache}
            x = torch.tensor([ids], device=self.device)
            out: list[int] = []
            start = read = 0  # out[start:read] is context already shown, out[read:] is not
            for i in range(max_tokens):
                logits = self.lm(input_ids=x, **args).logits[0, -1].float()
                if i < min_tokens:
                    logits.index_fill_(0, self.eos_ids, float("-inf"))
                x = _pick(logits, temperature, top_p, gen)
                token = int(x)  # the one sync per token
                if token in self.eos:
                    break
                x = x.to(self.device)
                out.append(token)
                if stats is not None:
                    stats["tokens"] = len(out)
                before = self.tokenizer.decode(out[start:read], skip_special_tokens=True)
                text = self.tokenizer.decode(out[start:], skip_special_tokens=True)
                if text.endswith("\ufffd") and i < max_tokens - 1:
                    yield ""  # one chunk per token; the last shows an incomplete character
                    continue
                yield text[len(before):]
                start, read = read, len(out)


def _pick(logits, temperature: float, top_p: float, gen):
    """The next token as a (1, 1) tensor: on the logits' device when greedy, else the CPU."""
    import torch

    if temperature <= 0:
        return torch.argmax(logits).view(1, 1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if 0 < top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # no boolean indexing: no sync
        probs = probs.scatter(0, order, sorted_p.masked_fill(~keep, 0.0))
    return torch.multinomial(probs.cpu(), 1, generator=gen).view(1, 1)


_END = object()  # after the last piece of an answer


class MainThreadModel:
    """``ChatModel.generate`` as the HTTP threads call it, run by the thread in ``work``.

    ``generate`` queues the request and yields the pieces the working thread sends back; a
    caller that stops reading (``close``, a client gone) makes the working thread stop after
    the token in hand. An error in the model reaches the caller as that exception."""

    def __init__(self, chat: ChatModel):
        self.chat = chat
        self.jobs: queue.Queue = queue.Queue()

    def __getattr__(self, name: str) -> Any:  # name, model_ids, prompt_ids, ...
        return getattr(self.chat, name)

    def generate(self, ids: list[int], **kw: Any) -> Iterator[str]:
        pieces: queue.Queue = queue.Queue()
        gone = threading.Event()
        self.jobs.put((ids, kw, pieces, gone))
        try:
            while (piece := pieces.get()) is not _END:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            gone.set()

    def work(self, stop: threading.Event, poll_s: float = 0.2) -> None:
        """Answer queued requests, one at a time, until ``stop`` is set."""
        while not stop.is_set():
            try:
                ids, kw, pieces, gone = self.jobs.get(timeout=poll_s)
            except queue.Empty:
                continue
            answer = self.chat.generate(ids, **kw)
            try:
                for piece in answer:
                    if gone.is_set():
                        break
                    pieces.put(piece)
            except Exception as exc:  # noqa: BLE001 - the request's thread reports it
                pieces.put(exc)
            finally:
                answer.close()  # its lock released before the next request is taken
            pieces.put(_END)


class _Handler(BaseHTTPRequestHandler):
    server_version = "remoteops-serve"
    chat: ChatModel | MainThreadModel  # set on the subclass

    def log_message(self, fmt: str, *args: Any) -> None:  # one short line per request
        print(f"{self.address_string()} {fmt % args}", flush=True)

    def _json(self, code: int, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
        self._json(code, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/health":
            self._json(200, {"status": "ok", "model": self.chat.name})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "owned_by": "remoteops"}
                for m in self.chat.model_ids()]})
        else:
            self._error(404, f"no route {self.path}; use /v1/chat/completions")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/v1/chat/completions":
            self._error(404, f"no route {self.path}; use /v1/chat/completions")
            return
        try:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            messages = req["messages"]
            assert isinstance(messages, list) and messages
            model = str(req.get("model") or self.chat.name)
            max_tokens = int(req.get("max_tokens") or req.get("max_completion_tokens") or 256)
            args = dict(max_tokens=max(1, max_tokens),
                        temperature=float(req.get("temperature", 1.0)),
                        top_p=float(req.get("top_p", 1.0)),
                        min_tokens=int(req.get("min_tokens") or 0),
                        seed=req.get("seed"), use_base=model == BASE_ID)
            ids = self.chat.prompt_ids(messages)
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            self._error(400, f"bad request ({type(exc).__name__}: {exc}); send JSON with "
                             "messages = [{role, content}, ...]")
            return
        if model not in self.chat.model_ids():
            self._error(404, f"model {model!r} is not served; /v1/models lists them")
            return
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        stats = {"tokens": 0}
        pieces = self.chat.generate(ids, **args, stats=stats)
        if req.get("stream"):
            self._stream(cid, model, pieces)
            return
        parts = list(pieces)
        text, n = "".join(parts), stats["tokens"]
        self._json(200, {"id": cid, "object": "chat.completion", "created": int(time.time()),
                         "model": model, "choices": [{
                             "index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length" if n >= args["max_tokens"] else "stop"}],
                         "usage": {"prompt_tokens": len(ids), "completion_tokens": n,
                                   "total_tokens": len(ids) + n}})

    def _stream(self, cid: str, model: str, pieces: Iterator[str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def send(delta: dict, finish: str | None = None) -> None:
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            send({"role": "assistant"})
            for piece in pieces:
                send({"content": piece})
            send({}, "stop")
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away: the model stops after the token in hand
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()


def make_server(chat: ChatModel | MainThreadModel, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"chat": chat})
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(base: Path, adapter: Path | None, name: str, host: str, port: int) -> None:
    """Load the model, then answer on ``host:port`` until SIGTERM (or Ctrl-C): the HTTP server
    in a thread of its own, the model in this (the main) thread."""
    signal.signal(signal.SIGTERM, _stop)
    started = time.monotonic()
    chat = ChatModel(base, adapter, name)
    model = MainThreadModel(chat)
    server = make_server(model, host, port)
    http = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                            name="http", daemon=True)
    http.start()
    print(f"ready on http://{host}:{port}/v1 ({chat.device}, models {', '.join(chat.model_ids())}, "
          f"loaded in {time.monotonic() - started:.1f}s)", flush=True)
    try:
        model.work(threading.Event())
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        print("stopped", flush=True)
