"""Serve a GGUF file with llama-cpp-python's own OpenAI-compatible server.

``llama_cpp.server`` (FastAPI under uvicorn) needs the ``server`` extra of llama-cpp-python:
fastapi, uvicorn, sse-starlette, starlette-context, pydantic-settings (remoteops' ``serve``
extra). The model answers under the stage's name; the chat template is the one the
converter stored in the file. Every layer goes to the GPU when llama.cpp was built with one.
SIGTERM ends it (uvicorn's own handling).
"""

from __future__ import annotations

import time
from pathlib import Path

from remoteops.quant import missing_modules


def serve(model: Path, name: str, host: str, port: int, n_ctx: int = 2048) -> None:
    """Load ``model`` and answer on ``host:port`` until SIGTERM."""
    missing = missing_modules(["llama_cpp", "uvicorn", "fastapi", "sse_starlette",
                               "starlette_context", "pydantic_settings"])
    if missing:
        raise SystemExit(f"cannot serve a GGUF file: not importable: {', '.join(missing)}; "
                         "install them with pip install 'remoteops[quant,serve]'")
    import llama_cpp
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    started = time.monotonic()
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    app = create_app(server_settings=ServerSettings(host=host, port=port),
                     model_settings=[ModelSettings(model=str(model), model_alias=name,
                                                   n_ctx=n_ctx, n_gpu_layers=-1 if gpu else 0,
                                                   verbose=False)])
    print(f"loaded {model} in {time.monotonic() - started:.1f}s "
          f"({'GPU offload' if gpu else 'CPU'}); ready on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
