"""The demo project's files, cut down for tests that train on a few samples."""

from __future__ import annotations

from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "remoteops" / "demo"


def adapter_weights(folder: Path) -> dict:
    """The tensors of the LoRA adapter saved in ``folder`` (by name)."""
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def head_lines(src: Path, dest: Path, n: int) -> None:
    """Write the first ``n`` lines of ``src`` to ``dest`` (its folder made)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(src.read_text(encoding="utf-8").splitlines(True)[:n]),
                    encoding="utf-8")
