"""The README's "What remoteops guarantees" section names tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("## What remoteops guarantees")
    return text[start: text.index("\n## ", start + 1)]


def test_every_guarantee_names_a_test_that_exists():
    section = _section()
    refs = re.findall(r"`((?:tests/)?[\w/]*test_\w+\.py)?(?:::(\w+))?`", section)
    assert len(refs) >= 25, refs
    current = None
    checked = 0
    for line in section.splitlines():
        for file, name in re.findall(r"`((?:tests/)?[\w/]*test_\w+\.py)?(?:::(\w+))?`", line):
            if file:
                path = REPO / file if file.startswith("tests/") else \
                    REPO / "tests" / "reliability" / file
                assert path.is_file(), file
                current = path
            if name:
                assert current is not None, line
                assert re.search(rf"^def {name}\(", current.read_text(encoding="utf-8"),
                                 re.M), f"{current.name}::{name} named in README does not exist"
                checked += 1
    assert checked >= 20
