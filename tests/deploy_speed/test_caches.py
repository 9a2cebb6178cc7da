"""The caches that make a redeploy cheap choose exactly what a fresh look would: the folder
cache of the file selection, the toolkit wheel kept while its sources hold, and the server's
stat cache written from the plan's own scan."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from remoteops.laptop.selection import select
from remoteops.laptop.wheel import build_toolkit_wheel
from remoteops.server.projectroot import ProjectRoot
from tests.test_deploy import ENV, as_json, expected_tree, make_project, tree


def _tree(root: Path) -> None:
    for rel, text in {"a.py": "a", "pkg/b.py": "b", "pkg/.gitignore": "*.log\n",
                      "pkg/run.log": "log", "keys/id_map.json": "{}", "data/x.txt": "x"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _fresh(root: Path):
    return select(root, [], [], [], ["/bundles/"])


def _cached(root: Path, cache: Path):
    return select(root, [], [], [], ["/bundles/"], cache=cache)


def _same(a, b) -> bool:
    return (a.paths, a.excluded, a.secrets, a.rels, a.links) == \
        (b.paths, b.excluded, b.secrets, b.rels, b.links)


def test_the_folder_cache_sees_every_change_a_fresh_walk_sees(tmp_path):
    root, cache = tmp_path / "proj", tmp_path / "selection.json"
    _tree(root)
    time.sleep(3.2)  # older than the racy window: every folder is cached
    assert _same(_cached(root, cache), _fresh(root))
    assert len(json.loads(cache.read_text())["folders"]) == 4
    assert _same(_cached(root, cache), _fresh(root))  # served from the cache

    (root / "pkg" / "new.py").write_text("new")              # a new name: the folder changed
    (root / "pkg" / ".gitignore").write_text("*.py\n")       # a rule's text, folder unchanged
    (root / "keys" / "id_map.json").write_text(              # bytes that make it a key
        "-----BEGIN OPENSSH PRIVATE KEY-----\n")
    os.rename(root / "keys" / "id_map.json", root / "keys" / "id_ed25519")
    os.symlink("a.py", root / "data" / "link")
    got, want = _cached(root, cache), _fresh(root)
    assert _same(got, want)
    assert "pkg/new.py" not in got.rels and "pkg/b.py" not in got.rels   # the new .gitignore
    assert got.secrets == ["keys/id_ed25519"] and "data/link" in got.links


def test_the_folder_cache_is_dropped_when_the_settings_change(tmp_path):
    root, cache = tmp_path / "proj", tmp_path / "selection.json"
    _tree(root)
    time.sleep(3.2)
    _cached(root, cache)
    got = select(root, [], ["data/"], [], ["/bundles/"], cache=cache)
    assert "data/x.txt" not in got.rels and got.excluded["bundle.exclude"] == ["data/"]


def test_the_toolkit_wheel_is_kept_while_its_sources_hold(tmp_path):
    first = build_toolkit_wheel(tmp_path / "a")
    written = first.stat().st_mtime_ns
    again = build_toolkit_wheel(tmp_path / "a")
    assert again.stat().st_mtime_ns == written                   # not written again
    assert again.read_bytes() == build_toolkit_wheel(tmp_path / "b").read_bytes()
    again.write_bytes(b"not a wheel")                            # replaced behind our back
    assert build_toolkit_wheel(tmp_path / "a").read_bytes() == \
        (tmp_path / "b" / first.name).read_bytes()


def test_the_wheel_carries_the_installed_metadata_without_loading_the_plugin_machinery(
        tmp_path):
    """The wheel's METADATA and entry points are the installed distribution's, as
    importlib.metadata reads them; a deploy's process finds them (and the built-in plugins)
    without importing importlib.metadata or pluggy (~20 ms of each command's start)."""
    import importlib.metadata
    import subprocess
    import sys
    import zipfile

    dist = importlib.metadata.distribution("remoteops")
    with zipfile.ZipFile(build_toolkit_wheel(tmp_path / "a")) as zf:
        info = f"remoteops-{dist.version}.dist-info"
        assert zf.read(f"{info}/METADATA").decode() == dist.read_text("METADATA")
        assert zf.read(f"{info}/entry_points.txt").decode() == dist.read_text(
            "entry_points.txt")
        assert any(n.startswith("remoteops/_builtin_plugins/") for n in zf.namelist())
    probe = ("import sys; from pathlib import Path; import remoteops.laptop.deploy; "
             "from remoteops.laptop.wheel import build_toolkit_wheel; "
             f"build_toolkit_wheel(Path({str(tmp_path / 'b')!r})); "
             "print(sorted(m for m in ('importlib.metadata', 'pluggy', 'remoteops.plugins') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_a_first_bundle_takes_the_toolkit_wheel_another_project_made(tmp_path, home,
                                                                      monkeypatch):
    """The user's cache keeps one wheel per toolkit: a new project's first bundle copies it
    (the same bytes) instead of zipping the package again; one changed there is not used."""
    import remoteops.laptop.wheel as wheel_module

    real = wheel_module._write_wheel
    first = build_toolkit_wheel(tmp_path / "a")
    shared = home / ".cache" / "remoteops" / "toolkit" / first.name
    assert shared.read_bytes() == first.read_bytes()
    monkeypatch.setattr(wheel_module, "_write_wheel", None)  # zipping again would fail
    copied = build_toolkit_wheel(tmp_path / "b")
    assert copied.read_bytes() == first.read_bytes()
    assert build_toolkit_wheel(tmp_path / "b") == copied  # and kept there from now on
    monkeypatch.setattr(wheel_module, "_write_wheel", real)
    shared.write_bytes(b"not a wheel")  # changed behind our back: made afresh instead
    made = build_toolkit_wheel(tmp_path / "c")
    assert made.read_bytes() == first.read_bytes()


def test_an_edit_that_keeps_size_and_mtime_still_deploys(cli, home, project, tmp_path):
    """Both caches key on the ctime too (as git and rsync --checksum would see it)."""
    make_project(project)
    root = tmp_path / "server"
    args = ("deploy-bundle", "--host", "local", "--project-root", str(root), "--yes", "--json")
    assert cli(*args, env=ENV).returncode == 0
    time.sleep(3.2)  # past the racy window: the next build trusts its caches
    assert as_json(cli(*args, env=ENV))["noop"]
    path = project / "code" / "train.py"
    st = path.stat()
    path.write_text("print('TRAIN')\n"[:st.st_size].ljust(st.st_size))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    out = as_json(cli(*args, env=ENV))
    assert out["plan"]["changed"] == ["code/train.py"]
    assert tree(root) == expected_tree(project)
    # the server's stat cache, written from the plan's scan, is what a fresh scan reads
    index = json.loads((root / ".remoteops" / "index.json").read_text())
    assert index == ProjectRoot(root).scan(sorted(index)).index


def test_many_staged_files_are_made_durable_with_one_syncfs(tmp_path, cli, home, project):
    from remoteops.server.durable import SYNCFS_MIN_FILES, make_durable

    files = []
    for i in range(SYNCFS_MIN_FILES):
        path = tmp_path / "staging" / f"d{i % 4}" / f"f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * i)
        files.append(path)
    folders = {p.parent for p in files} | {tmp_path / "staging"}
    release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
    assert make_durable(files, folders, tmp_path) == ("syncfs" if release >= (5, 8) else "fsync")
    assert make_durable(files[:3], folders, tmp_path) == "fsync"  # a few: their own fsyncs
    # a whole deploy of more files than that goes through it, every byte checked as before
    make_project(project)
    for i in range(SYNCFS_MIN_FILES + 10):
        (project / "data" / "many" / f"s{i:03d}.txt").parent.mkdir(parents=True, exist_ok=True)
        (project / "data" / "many" / f"s{i:03d}.txt").write_text(f"sample {i}\n" * (i + 1))
    root = tmp_path / "server"
    res = cli("deploy-bundle", "--host", "local", "--project-root", str(root), "--yes", "--json",
              env=ENV)
    assert res.returncode == 0, res.stderr
    assert tree(root) == expected_tree(project)


def test_the_deploy_request_starts_without_click_and_answers_as_the_click_cli(tmp_path):
    """``python -m remoteops.agent deploy-stream --root R --json`` (what the laptop sends)
    skips click; the click command answers the same, for any other spelling."""
    import subprocess
    import sys

    def agent(module: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args],
                              input=stdin, capture_output=True, timeout=60)

    root = str(tmp_path / "root")
    lean = agent("remoteops.agent", "deploy-stream", "--root", root, "--json")
    full = agent("remoteops.server.agent", "deploy-stream", "--root", root, "--json")
    said = [[l for l in r.stderr.decode().splitlines() if not l.startswith("import time:")]
            for r in (lean, full)]
    assert lean.returncode == full.returncode == 2
    assert said[0] == said[1] == ["error: no deploy arrived (the laptop stopped before "
                                  "sending it); nothing was changed."]
    click = re.compile(rb"\|\s+click\n")
    assert not click.search(lean.stderr) and click.search(full.stderr)
    garbage = agent("remoteops.agent", "deploy-stream", "--root", root, "--json",
                    stdin=b"echo banner\n")
    assert garbage.returncode != 0 and b"guard it with [[ $- == *i* ]]" in garbage.stderr
