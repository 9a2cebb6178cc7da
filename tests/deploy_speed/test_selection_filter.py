"""The selection's quick filter (``selection._any_filter``): it may only spare pathspec a
path that no pattern matches, never change which files ship.

Checked two ways: against pathspec itself on many generated paths and rule sets (the
defaults, configured excludes, ``.gitignore`` texts with anchors, ``**``, classes,
negations and folders), and by choosing a real project's files with the filter and
without it (the same files, the same exclusions, the same rules named).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from remoteops.laptop import selection
from remoteops.laptop.selection import DEFAULT_EXCLUDES, _any_filter, _spec, select

RULE_SETS = [
    DEFAULT_EXCLUDES + ["/bundles/"],
    ["*.log", "build/", "/dist", "docs/**/*.tmp", "!keep.log", "data/raw/", "cache*"],
    ["**/secret_*", "[Tt]emp/", "a?c.txt", "/top.txt", "nested/deep/", "*.py[cod]"],
    ["# a comment", "", "   ", "*.bin", "!important.bin", "out/*/tmp/"],
]
NAMES = ["a", "abc.txt", "a.log", "keep.log", "build", "dist", "docs", "x.tmp", "data", "raw",
         "cache1", "secret_key", "Temp", "temp", "top.txt", "nested", "deep", "m.py", "m.pyc",
         "important.bin", "w.bin", "out", "tmp", ".git", "__pycache__", "env", "venv",
         "outputs", "checkpoint-3", "bundles", ".DS_Store", "node_modules", "wandb"]


def _paths(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        parts = [rng.choice(NAMES) for _ in range(rng.randint(1, 5))]
        out.append("/".join(parts) + ("/" if rng.random() < 0.3 else ""))
    return out


@pytest.mark.parametrize("rules", RULE_SETS, ids=["defaults", "gitignore-1", "gitignore-2",
                                                  "gitignore-3"])
def test_the_filter_finds_every_path_the_rules_match(rules):
    spec = _spec(rules)
    quick = _any_filter(spec)
    assert quick is not None
    paths = _paths(random.Random(7), 20000)
    matched = [p for p in paths if spec.match_file(p)]
    assert len(matched) > 200  # the generated paths exercise the rules
    missed = [p for p in matched if not quick.search(p)]
    assert missed == []
    spared = [p for p in paths if not quick.search(p)]
    assert len(spared) > 1000  # and it spares pathspec most of the others


def test_no_patterns_or_only_negations_leave_every_path_to_pathspec():
    assert _any_filter(_spec(["!a.txt"])) is None
    assert _any_filter(_spec(["# only a comment"])) is None


def _project(root: Path) -> None:
    rng = random.Random(3)
    for path in _paths(rng, 600):
        target = root / path
        try:  # a name taken by a file on one path and a folder on another: the first wins
            if path.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
            elif not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(path)
        except OSError:
            continue
    (root / ".gitignore").write_text("\n".join(RULE_SETS[1]) + "\n")
    for folder in ("docs", "data", "nested"):
        if (root / folder).is_dir():
            (root / folder / ".gitignore").write_text("\n".join(RULE_SETS[2]) + "\n")


def test_a_project_chooses_the_same_files_with_the_filter_and_without(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    root.mkdir()
    _project(root)
    exclude = ["*.bin", "!important.bin", "out/*/tmp/"]
    with_filter = select(root, [], exclude)
    monkeypatch.setattr(selection, "_any_filter", lambda spec: None)
    without = select(root, [], exclude)
    assert len(with_filter.rels) > 50 and with_filter.excluded  # rules at work
    assert with_filter.rels == without.rels
    assert with_filter.excluded == without.excluded
    assert with_filter.secrets == without.secrets
