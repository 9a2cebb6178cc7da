"""The tiny demo model, built once for this folder's tests that train or load it."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from remoteops.trainer.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("base-model") / "demo-model", seed=0)
