"""The README's examples work as shown: taken from README.md itself, so the test fails when
the README drifts (a loss_pattern that misses HF's ``{'loss': nan}`` was once shown)."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path

import pytest

from remoteops.common.defaults import HEALTH_DEFAULTS
from remoteops.server.logwatch import check_text, parse_losses

README = Path(__file__).resolve().parents[2] / "README.md"


def toml_blocks() -> list[str]:
    return re.findall(r"^```toml\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def _patterns(table: dict, where: str) -> list[tuple[str, str]]:
    found = []
    for key, value in table.items():
        if isinstance(value, dict):
            found += _patterns(value, f"{where}.{key}")
        elif key == "loss_pattern":
            found.append((f"{where}.{key}".lstrip("."), value))
    return found


def readme_patterns() -> list[tuple[str, str]]:
    return [p for block in toml_blocks() for p in _patterns(tomllib.loads(block), "")]


# log formats the README says a loss pattern reads, with the losses in them
LOGS = {
    "hf": ("{'loss': 2.3456, 'grad_norm': 1.25, 'learning_rate': 0.0002, 'epoch': 0.1}\n"
           "{'loss': nan, 'grad_norm': nan, 'learning_rate': 0.0002, 'epoch': 0.2}\n",
           [2.3456, math.nan]),
    "hf-strings": ("{'loss': '2.3456', 'grad_norm': '1.25', 'epoch': '0.1'}\n"
                   "{'loss': 'nan', 'grad_norm': 'nan', 'epoch': '0.2'}\n", [2.3456, math.nan]),
    "equals": ("step 1 loss=2.5 lr=1e-4\nstep 2 loss=1.5e-01 lr=1e-4\nstep 3 loss=nan lr=1e-4\n",
               [2.5, 0.15, math.nan]),
    "colon": ("step 1 loss: 2.5\nstep 2 loss: inf\nstep 3 loss: nan\n", [2.5, math.inf, math.nan]),
    "not-the-training-loss": ("{'train_loss': 0.5, 'eval_loss': 9.0}\n", []),
}


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y))
                                    for x, y in zip(a, b))


def test_the_readme_shows_a_loss_pattern():
    assert readme_patterns(), "the README no longer shows a loss_pattern example"


@pytest.mark.parametrize("fmt", sorted(LOGS))
def test_every_readme_loss_pattern_and_the_default_read_the_claimed_formats(fmt):
    text, expected = LOGS[fmt]
    for where, pattern in readme_patterns() + [("default", HEALTH_DEFAULTS["loss_pattern"])]:
        got = [v for _, v in parse_losses(text, pattern)]
        assert same(got, expected), (where, pattern, fmt, got)
        verdict = check_text(text, pattern)  # what the runner does with a command's log
        if any(math.isnan(v) for v in expected):
            assert not verdict.ok and verdict.reason == "nan", (where, fmt, verdict)


def test_every_readme_toml_block_is_valid_toml_and_a_valid_project_config(tmp_path, home):
    from remoteops.common.config import load_settings

    blocks = toml_blocks()
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        project = tmp_path / f"p{i}"
        project.mkdir()
        (project / "remoteops.toml").write_text(block, encoding="utf-8")
        load_settings(project)  # raises a ConfigError, naming the key, on a wrong example
