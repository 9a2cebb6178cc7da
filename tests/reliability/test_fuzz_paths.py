"""Fuzz the one path check (remoteops.common.paths) every manifest entry, tar member, link target
and backup record goes through: whatever it accepts stays inside the root, outside
``.remoteops/``, and names no file over NAME_MAX. A fixed budget keeps it to seconds."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from remoteops.common.bundle_tar import BundleError, check_member
from remoteops.common.paths import (NAME_MAX, RESERVED, UnsafePath, safe_link_target, safe_relpath)

PIECES = ["", ".", "..", "...", RESERVED, RESERVED.upper(), "a", "b c", "é", "\x00", "\\",
          "..\\..", "~", "$HOME", "n" * 255, "é" * 128, "x" * 256, "/", "//", "files"]
part = st.one_of(st.sampled_from(PIECES), st.text(max_size=12))
paths = st.one_of(st.lists(part, max_size=7).map("/".join), st.text(max_size=40))

FUZZ = settings(max_examples=500, deadline=None, derandomize=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-root").resolve()


def _inside(root: Path, rel: str) -> bool:
    resolved = (root / rel).resolve()
    if resolved != root and root not in resolved.parents:
        return False
    inner = resolved.relative_to(root).parts
    return not inner or inner[0] != RESERVED


@FUZZ
@given(name=paths)
def test_accepted_paths_stay_inside_the_root_and_out_of_remoteops(root, name):
    try:
        rel = safe_relpath(name)
    except UnsafePath as exc:
        assert "\n" not in str(exc)
        return
    assert rel and not rel.startswith("/") and _inside(root, rel)
    assert (root / rel).resolve() != root
    assert all(0 < len(os.fsencode(p)) <= NAME_MAX for p in rel.split("/"))
    assert safe_relpath(rel) == rel  # normal form is a fixed point


@FUZZ
@given(name=paths, target=paths)
def test_accepted_link_targets_resolve_inside_the_root(root, name, target):
    try:
        rel = safe_relpath(name)
        link = safe_link_target(rel, target)
    except UnsafePath:
        return
    assert _inside(root, os.path.join(os.path.dirname(rel), link))


@FUZZ
@given(name=paths)
def test_tar_members_pass_only_through_the_same_check(root, name):
    member = tarfile.TarInfo(name)
    try:
        accepted = check_member(member)
    except BundleError:
        with pytest.raises(UnsafePath):
            safe_relpath(name)
        return
    assert accepted == safe_relpath(name) and _inside(root, accepted)


def test_known_escapes_are_refused():
    for bad in ["/etc/passwd", "files//abs/path"[len("files/"):], "../x", "a/../../x",
                ".remoteops/journal.json", "./.remoteops", "a\\..\\..\\x", "", ".", "x" * 256]:
        with pytest.raises(UnsafePath):
            safe_relpath(bad)
    assert safe_relpath("files//abs/path") == "files/abs/path"
    assert safe_relpath("a/./b//c") == "a/b/c"
    for rel, target in [("a", ".."), ("a/b", "../.."), ("a", "/etc"), ("a/b", "x/../../.."),
                        ("l", ".remoteops/current.json"), ("a/l", "../.remoteops")]:
        with pytest.raises(UnsafePath):
            safe_link_target(rel, target)
    assert safe_link_target("a/b/l", "../../c") == "../../c"
