"""Which project files a bundle ships: default excludes, ``bundle.include``/``exclude``,
every ``.gitignore``, secrets; and a cache of that choice, folder by folder.

A redeploy of a 2,000-file project spent more time choosing its files again
(listing folders and matching every path against every rule) than hashing the
one that changed. ``FolderCache`` (``<bundles>/.selection.json``) keeps, for each
folder, its entries (name and kind) and the rule that leaves each out, under a
key of the folder's own stat (mtime, ctime, inode: any name created, removed or
renamed in it changes them) and of every rule in scope (the settings and the
text of each ``.gitignore`` from the root down, read every time). A folder
changed in the last few seconds is not cached (as ``HashCache``: its next change
may keep the same time stamp). What depends on a file's bytes is decided every
time: whether an ``id_*`` file holds a private key, and where a link points.
Which files changed is the hash cache's business (``build.HashCache``, by each
file's own stat), not this one's: an edit that keeps a file's size and mtime
still changes its ctime and is hashed again. A folder that is not cached asks pathspec
only about the paths one regex of all of a rule set's patterns finds (``_any_filter``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from remoteops import __version__
from remoteops.common.bundle_tar import BundleError
from remoteops.common.files import write_atomic_text
from remoteops.common.paths import link_entry
from remoteops.common.secret_rules import (SECRET_CANDIDATE, SECRET_FILE_PATTERNS,
                                           looks_like_private_key)

if TYPE_CHECKING:  # imported where used: the agent on the server never selects files
    import pathspec

# Excluded whatever the config says: VCS data, caches, environments, outputs. Everyday
# words (env, outputs, checkpoints, ...) are anchored to the project root, so a package
# folder code/env/ or a data/checkpoints/ folder deep in the tree still ships; names
# only tools use are excluded wherever they are. Secrets: remoteops.common.secret_rules.
DEFAULT_EXCLUDES = [
    ".git/", ".hg/", ".svn/", "__pycache__/", "*.py[cod]", ".venv/", "/venv/", "/env/",
    ".mypy_cache/", ".pytest_cache/", ".ruff_cache/", ".ipynb_checkpoints/",
    "node_modules/", "/outputs/", "/bundles/", ".remoteops/", "/checkpoints/", "checkpoint-*/",
    "/wandb/", "/mlruns/", ".DS_Store",
]
RACY_NS = 3 * 10**9
# an entry's kind: a folder, a link to a folder, a file, a link, anything else
DIR, DIR_LINK, FILE, LINK, OTHER = "d", "D", "f", "l", "o"
# a file named as a secret, left out or shipped (bundle.include_secrets); no rule has a NUL
SECRET, SECRET_OK = "\0secret", "\0secret-allowed"


def _spec(lines: Iterable[str]) -> "pathspec.PathSpec":
    import pathspec  # imported here: the agent on the server never selects files

    return pathspec.GitIgnoreSpec.from_lines([l for l in lines if l.strip()])


_NAMED = re.compile(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>")


def _any_filter(spec) -> "re.Pattern[str] | None":
    """One regex that finds (``search``, as pathspec does with each pattern) every path some
    pattern of ``spec`` (a ``GitIgnoreSpec``) includes: its patterns' own regexes as
    alternatives, named groups unnamed. A path it does not find is not matched by the
    spec, so the spec is not asked (it tries its patterns one by one: ~25 ms of a
    2,000-file first deploy's selection). The paths asked are relative and posix already
    (what pathspec would normalize them to). None when the patterns do not allow it
    (every path is asked)."""
    alternatives, flags = [], set()
    for pattern in getattr(spec, "patterns", ()):
        if pattern.include is None or not pattern.include:
            continue  # a comment or blank, or a re-inclusion: never what makes a match
        regex = getattr(pattern, "regex", None)
        if regex is None or "(?P=" in regex.pattern:
            return None
        alternatives.append(_NAMED.sub("(?:", regex.pattern))
        flags.add(regex.flags)
    if not alternatives or len(flags) != 1:
        return None
    try:
        return re.compile("|".join(f"(?:{a})" for a in alternatives), flags.pop())
    except re.error:
        return None


@dataclass
class Selection:
    """The files to ship, and what was left out and why (for the plan)."""

    paths: list[Path]
    excluded: dict[str, list[str]]          # rule -> excluded paths (a folder ends in /)
    secrets: list[str]                      # secret files left out
    secrets_included: list[str]             # secret files shipped: bundle.include_secrets
    rels: list[str] = field(default_factory=list)   # ``paths`` relative to the root, posix
    links: set[str] = field(default_factory=set)    # those of ``rels`` that are links

    def report(self) -> dict:
        return {"secrets": self.secrets, "secrets_included": self.secrets_included,
                "rules": self.excluded}


def _name_error(path: Path) -> BundleError:
    return BundleError(f"the name of {os.fsencode(path)!r} is not UTF-8, so a bundle (and its "
                       "JSON manifest) cannot carry it; rename it (e.g. convmv -f latin1 -t utf8 "
                       "--notest) or leave it out with bundle.exclude or .gitignore.")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # os.walk turns undecodable bytes into lone surrogates
        return True
    except UnicodeEncodeError:
        return False


def _shown(rel: str) -> str:
    """``rel`` printable: a non-UTF-8 byte shows as \\xNN instead of breaking the output."""
    return rel if _is_utf8(rel) else os.fsencode(rel).decode("utf-8", "backslashreplace")


class FolderCache:
    """Each folder's entries and decisions, kept while the folder and the rules hold."""

    def __init__(self, path: Path | None, rules_key: str):
        self.path, self.rules_key = path, rules_key
        self.old: dict = {}
        if path is not None:
            try:
                data = json.loads(path.read_text())
                if data.get("rules") == rules_key:
                    self.old = data["folders"]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
        self.new: dict[str, list] = {}
        self.now = time.time_ns()

    def get(self, rel_dir: str, key: list) -> list | None:
        cached = self.old.get(rel_dir)
        if isinstance(cached, list) and len(cached) == 2 and cached[0] == key:
            self.new[rel_dir] = cached
            return cached[1]
        return None

    def put(self, rel_dir: str, key: list, st: os.stat_result, entries: list) -> None:
        if self.now - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
            self.new[rel_dir] = [key, entries]

    def save(self) -> None:
        if self.path is None or self.new == self.old:
            return
        try:
            write_atomic_text(self.path, json.dumps({"rules": self.rules_key,
                                                     "folders": self.new},
                                                    separators=(",", ":")))
        except OSError:
            pass  # only a cache


def _list(folder: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]] | None:
    """Sorted (name, kind) of the folders and of the other entries, as ``os.walk`` splits
    them (a link to a folder counts as a folder); None when it cannot be listed."""
    dirs, files = [], []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                link = entry.is_symlink()
                if is_dir:
                    dirs.append((entry.name, DIR_LINK if link else DIR))
                elif link:
                    files.append((entry.name, LINK))
                else:
                    files.append((entry.name, FILE if entry.is_file() else OTHER))
    except OSError:
        return None
    return sorted(dirs), sorted(files)


def select(project: Path, include: list[str], exclude: list[str],
           include_secrets: Iterable[str] = (), extra_excludes: Iterable[str] = (),
           cache: Path | None = None) -> Selection:
    """Choose the files to ship and record what each rule left out.

    ``include_secrets``: paths (globs allowed) relative to the project root of secret
    files to ship anyway. ``extra_excludes``: more anchored rules (the bundles folder).
    ``cache``: where ``FolderCache`` keeps its record (None: none).
    """
    extra = list(extra_excludes)
    wanted_secrets = [p for p in include_secrets if p.strip()]
    rules_key = hashlib.sha256(json.dumps(
        [__version__, DEFAULT_EXCLUDES, extra, list(exclude), list(include), wanted_secrets,
         list(SECRET_FILE_PATTERNS)]).encode()).hexdigest()
    folders = FolderCache(cache, rules_key)
    specs: dict[str, object] = {}

    def spec(name: str):
        """The rule sets, compiled on first use (a fully cached walk compiles none)."""
        if name not in specs:
            defaults = _spec(DEFAULT_EXCLUDES + extra)
            configured = _spec(exclude) if exclude else None
            specs.update(
                rules=[(p, _spec([p])) for p in DEFAULT_EXCLUDES + extra],
                defaults=defaults, defaults_quick=_any_filter(defaults),
                configured=configured,
                configured_quick=_any_filter(configured) if configured else None,
                included=_spec(include) if include else None,
                secret=_spec(SECRET_FILE_PATTERNS),
                allowed=_spec("/" + p.lstrip("/") for p in wanted_secrets)
                if wanted_secrets else None)
        return specs[name]

    chosen: list[Path] = []
    excluded: dict[str, list[str]] = {}
    secrets: list[str] = []
    shipped_secrets: list[str] = []
    root = project.resolve()
    # (folder, rel_dir, the .gitignore texts in scope: (base, text)), walked as os.walk does
    rels: list[str] = []
    links: set[str] = set()

    def ship(path: str, rel: str, link: bool) -> None:
        if link:  # kept as a link; one leaving the project is refused
            link_entry(root, Path(path))
            links.add(rel)
        chosen.append(Path(path))
        rels.append(rel)

    # (folder, rel_dir, the .gitignore texts in scope: (base, text)), walked as os.walk does
    stack: list[tuple[str, str, tuple]] = [(str(root), "", ())]
    while stack:
        folder, rel_dir, scope = stack.pop()
        gitignore = Path(folder, ".gitignore")
        if gitignore.is_file():
            scope = scope + ((rel_dir, gitignore.read_text(errors="replace")),)
        try:
            st = os.stat(folder)
        except OSError:
            continue
        key = [st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
               hashlib.sha256(json.dumps(scope).encode()).hexdigest()[:32]]
        entries = folders.get(rel_dir, key)
        if entries is not None and not _links_hold(folder, entries):
            entries = None
        if entries is None:
            listed = _list(folder)
            if listed is None:
                continue
            entries = _decide(rel_dir, scope, *listed, spec, folder)
            folders.put(rel_dir, key, st, entries)
        kept = []
        prefix = folder + os.sep
        for name, kind, rule in entries:
            rel = f"{rel_dir}{name}"
            if kind in (DIR, DIR_LINK):
                if rule is not None:
                    excluded.setdefault(rule, []).append(_shown(rel + "/"))
                elif kind == DIR_LINK:
                    ship(prefix + name, rel, True)  # a link to a folder: kept as a link
                else:
                    kept.append((prefix + name, rel + "/", scope))
                continue
            if rule is not None and rule not in (SECRET, SECRET_OK):
                excluded.setdefault(rule, []).append(_shown(rel))
                continue
            if rule is not None or (name.startswith("id_")
                                    and looks_like_private_key(Path(prefix + name))):
                if rule != SECRET_OK and (rule == SECRET or spec("allowed") is None
                                          or not spec("allowed").match_file(rel)):
                    secrets.append(rel)
                    continue
                shipped_secrets.append(rel)
            if kind in (LINK, FILE):
                ship(prefix + name, rel, kind == LINK)
        stack.extend(reversed(kept))
    folders.save()
    return Selection(chosen, excluded, secrets, shipped_secrets, rels, links)


def _links_hold(folder: str, entries: list) -> bool:
    """A cached link still points at the kind it did (its target may change elsewhere,
    which this folder's stat does not show)."""
    return all(os.path.isdir(os.path.join(folder, name)) == (kind == DIR_LINK)
               for name, kind, _ in entries if kind in (DIR_LINK, LINK))


def _decide(rel_dir: str, scope: tuple, dirs: list[tuple[str, str]],
            files: list[tuple[str, str]], spec, folder: str) -> list[list]:
    """``[name, kind, rule]`` for each entry, folders first: the rule that leaves it out,
    None when it ships, or SECRET / SECRET_OK for a file named as a secret."""
    ignores = [(base, _spec(text.splitlines())) for base, text in scope]
    ignores = [(base, s, _any_filter(s)) for base, s in ignores]

    def matches(name: str, rel: str) -> bool:
        quick = spec(name + "_quick")  # (see ``_any_filter``)
        return (quick is None or quick.search(rel) is not None) and spec(name).match_file(rel)

    def rule_for(rel: str) -> str | None:
        """The rule that leaves ``rel`` out (None: it ships)."""
        if matches("defaults", rel):
            return next(p for p, s in spec("rules") if s.match_file(rel))
        if spec("configured") is not None and matches("configured", rel):
            return "bundle.exclude"
        for base, s, quick in ignores:
            if rel.startswith(base) and (quick is None or quick.search(rel[len(base):])) and \
                    s.match_file(rel[len(base):]):
                return f"{base}.gitignore"
        return None

    out: list[list] = []
    for name, kind in dirs:
        rule = rule_for(f"{rel_dir}{name}/")
        if rule is None and not _is_utf8(name):
            raise _name_error(Path(folder) / name)
        out.append([name, kind, rule])
    for name, kind in files:
        rel = f"{rel_dir}{name}"
        rule = rule_for(rel)
        if rule is None and spec("included") is not None and \
                not spec("included").match_file(rel):
            rule = "not in bundle.include"
        if rule is None:
            if not _is_utf8(name):
                raise _name_error(Path(folder) / name)
            if SECRET_CANDIDATE.search(rel) and spec("secret").match_file(rel):
                allowed = spec("allowed")
                rule = SECRET_OK if allowed is not None and allowed.match_file(rel) else SECRET
        out.append([name, kind, rule])
    return out


def select_files(project: Path, include: list[str], exclude: list[str]) -> list[Path]:
    """Project files to ship: not excluded by defaults, config, any .gitignore or as secrets."""
    return select(project, include, exclude).paths


__all__ = ["DEFAULT_EXCLUDES", "FolderCache", "Selection", "select", "select_files"]
