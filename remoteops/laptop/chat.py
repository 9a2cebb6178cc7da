"""``invoke chat``: a plain-HTTP client (urllib, no torch) for an OpenAI-compatible server.

``complete`` sends one chat request, streamed, and measures what a person feels: the time
to the first token and the tokens per second after it (a streamed chunk is a token on both
backends). ``compare`` asks the adapter and the base model the same prompts, and
``compare_record`` is what ``--report`` writes into the run (``chat_compare_<stage>.json``,
shown in its TRAINING_SUMMARY.md).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Callable

from remoteops.common.clock import now_iso
from remoteops.common.errors import RemoteOpsError


def _post(url: str, body: dict, timeout: float):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", {})
            detail = detail.get("message") if isinstance(detail, dict) else detail
        except (ValueError, AttributeError):
            detail = exc.reason
        raise RemoteOpsError(f"the chat server answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RemoteOpsError(f"cannot reach the chat server at {url} ({exc}); is it still "
                             "served? 'invoke serve --status' says.") from None


def models(base_url: str, timeout: float = 10) -> list[str]:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=timeout) as resp:
            return [m["id"] for m in json.loads(resp.read())["data"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        raise RemoteOpsError(f"cannot reach the chat server at {base_url} ({exc}); is it still "
                             "served? 'invoke serve --status' says.") from None


def complete(base_url: str, model: str, messages: list[dict], max_tokens: int = 256,
             temperature: float = 0.0, on_text: Callable[[str], None] | None = None,
             min_tokens: int = 0, timeout: float = 600) -> dict:
    """One streamed chat completion: text, tokens, first-token latency, tokens/s after it."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": temperature, "stream": True, "seed": 0}
    if min_tokens:
        body["min_tokens"] = min_tokens
    started = time.perf_counter()
    first = last = None
    parts: list[str] = []
    with _post(f"{base_url}/chat/completions", body, timeout) as resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                delta = json.loads(data)["choices"][0].get("delta") or {}
            except (ValueError, KeyError, IndexError):
                continue
            piece = delta.get("content")
            if piece is None:
                continue
            last = time.perf_counter()
            first = first or last
            parts.append(piece)
            if on_text:
                on_text(piece)
    ended = time.perf_counter()
    n = len(parts)
    return {"text": "".join(parts), "tokens": n, "seconds": round(ended - started, 4),
            "first_token_s": round(first - started, 4) if first else None,
            "tokens_per_s": round((n - 1) / (last - first), 2) if n > 1 and last > first else None}


def compare(base_url: str, adapter_model: str, base_model: str, prompts: list[dict],
            max_tokens: int, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Per prompt (``{"messages", "reference"?}``): the adapter's and the base model's answer."""
    rows = []
    for item in prompts:
        msgs = item["messages"]
        row = {"prompt": msgs[-1]["content"], "reference": item.get("reference"),
               "adapter": complete(base_url, adapter_model, msgs, max_tokens)["text"].strip(),
               "base": complete(base_url, base_model, msgs, max_tokens)["text"].strip()}
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def compare_record(entry: dict, rows: list[dict], max_tokens: int) -> dict:
    return {"stage": entry.get("stage"), "run_id": entry.get("run_id"),
            "format": entry.get("format"), "model": entry.get("model"),
            "base_model": entry.get("base_model"), "time": now_iso(),
            "max_tokens": max_tokens, "temperature": 0.0, "rows": rows}


__all__ = ["models", "complete", "compare", "compare_record"]
