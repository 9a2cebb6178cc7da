"""A deployed project root on this server and its ``.remoteops`` state files.

``current.json`` (the manifest of what is deployed), ``index.json`` (a stat cache
of hashes), ``ledger.jsonl`` (one line per change), ``lock``, and ``journal.json``
(present only while a change is under way, or after one was interrupted: it
names the backup the next command undoes, see ``remoteops.server.journal``).
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remoteops import __version__
from remoteops.common.clock import now_iso
from remoteops.common.errors import RemoteOpsError
from remoteops.common.files import sha256_file, stat_key, write_atomic_json
from remoteops.common.locks import FileLock
from remoteops.common.manifest import Manifest
from remoteops.common.paths import UnsafePath, canonical
from remoteops.common.paths import link_digest
from remoteops.server.applyplan import LINK_MODE
from remoteops.server.backupset import read_backup

STATE = ".remoteops"


def write_json(path: Path, data: Any) -> None:
    # no indent: only then does json use its C encoder (a 2,000-file manifest in ms, not 0.1 s)
    write_atomic_json(path, data, indent=None, ensure_ascii=False, newline=False)


@dataclass
class Scan:
    """What ``ProjectRoot.scan`` found on disk for the paths asked about."""

    hashes: dict[str, str] = field(default_factory=dict)  # path -> sha256 (a link: link_digest)
    modes: dict[str, int] = field(default_factory=dict)
    links: set[str] = field(default_factory=set)
    index: dict[str, list] = field(default_factory=dict)  # the fresh stat cache of the files


class ProjectRoot:
    """The deployed project root on this machine and its ``.remoteops`` state."""

    def __init__(self, root: str | Path):
        self.root = Path(os.path.expanduser(str(root))).resolve()
        self.state = self.root / STATE
        self.backups = self.state / "backups"
        self._current: tuple[tuple, Manifest] | None = None  # current.json's stat, parsed
        self._scanned: Scan | None = None  # the last plan's scan (see ``record``)

    def current(self) -> Manifest | None:
        """What is deployed (parsed once while current.json stays the same file: it is only
        ever replaced by rename, so its inode, size and times tell a new one)."""
        path = self.state / "current.json"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if self._current is None or self._current[0] != key:
            self._current = (key, Manifest.from_json(path.read_text()))
        return self._current[1]

    # -- hashes and the stat cache -------------------------------------------------------
    def _index(self) -> dict[str, list]:
        try:
            return json.loads((self.state / "index.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def hashes(self, paths: list[str], known: dict[str, str] | None = None) -> dict[str, str]:
        """sha256 of each existing file (a link: ``link_digest``); see ``scan``."""
        return self.scan(paths, known).hashes

    def scan(self, paths: list[str], known: dict[str, str] | None = None) -> Scan:
        """Hash, mode and kind of each existing file or link, reusing the stat cache while
        size, mtime, ctime and inode all match, as the laptop's cache does: an edit that
        keeps size and mtime (``cp -p``, ``touch -r``) still changes the ctime.

        ``known``: hashes of files this process has just written and verified itself.
        """
        index = self._index()
        known = known or {}
        found = Scan()
        root = str(self.root)
        missing: set[str] = set()  # folders not there: nothing under them is looked for
        for rel in paths:
            folder = os.path.dirname(rel)
            if folder in missing:
                continue
            path = os.path.join(root, rel)
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                if folder and not os.path.isdir(os.path.join(root, folder)):
                    missing.add(folder)  # (a first deploy: one look per folder, not per file)
                continue
            if stat.S_ISLNK(st.st_mode):
                found.hashes[rel], found.modes[rel] = link_digest(os.readlink(path)), LINK_MODE
                found.links.add(rel)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            found.modes[rel] = st.st_mode & 0o7777
            key = list(stat_key(st))
            cached = index.get(rel)
            if rel in known:
                found.hashes[rel] = known[rel]
            elif isinstance(cached, list) and len(cached) == 5 and cached[:4] == key:
                found.hashes[rel] = cached[4]
            else:
                found.hashes[rel] = sha256_file(Path(path))
            found.index[rel] = key + [found.hashes[rel]]
        return found

    def save_index(self, paths: list[str], known: dict[str, str] | None = None,
                   touched: set[str] | None = None) -> None:
        """The stat cache of ``paths``. With ``touched`` (what this change wrote or removed),
        the other paths keep what the plan's scan just read under the same lock, instead of
        a second stat pass: a cache entry is a stat with the hash read at that stat, so an
        entry older than the file only costs a rehash next time."""
        prior = self._scanned.index if self._scanned is not None and touched is not None \
            else {}
        touched = touched or set()
        index = {p: prior[p] for p in paths if p not in touched and p in prior}
        index.update(self.scan([p for p in paths if p in touched or p not in prior],
                               known).index)
        write_json(self.state / "index.json", {p: index[p] for p in sorted(index)})

    def record(self, after: dict | None, touched: list[str],
               known: dict[str, str] | None = None) -> None:
        """``after`` is what is deployed now (None: nothing); the stat cache follows."""
        if after is None:
            (self.state / "current.json").unlink(missing_ok=True)
        else:
            write_json(self.state / "current.json", after)
        keep = sorted(set(touched) | {f["path"] for f in (after or {}).get("files", [])})
        self.save_index(keep, known, set(touched))
        self._scanned = None  # one change per plan

    # -- ledger, lock, journal -----------------------------------------------------------
    def ledger(self, entry: dict) -> None:
        entry = {"time": now_iso(), "user": getpass.getuser(), "host": socket.gethostname(),
                 "agent": __version__, **entry}
        self.state.mkdir(parents=True, exist_ok=True)
        with open(self.state / "ledger.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def lock(self, holder: str) -> FileLock:
        return FileLock(self.state / "lock", holder)

    def pending_recovery(self) -> tuple[Path, dict] | None:
        """The backup of an interrupted change the next command will undo, if any."""
        journal_path = self.state / "journal.json"
        if not journal_path.is_file():
            return None
        try:
            name = json.loads(journal_path.read_text())["backup"]
            if "/" in canonical(name, "the journal", "remove .remoteops/journal.json by hand"):
                raise UnsafePath(f"the journal names {name!r}, not a backup folder; remove "
                                 f"{journal_path} by hand")
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteOpsError(f"{journal_path} is damaged ({exc}); check the tree and remove "
                                 "it by hand.") from None
        backup = self.backups / name
        return backup, read_backup(backup)

    # -- disk space ----------------------------------------------------------------------
    def free(self) -> int:
        return shutil.disk_usage(self._existing_parent(self.root)).free

    @staticmethod
    def _existing_parent(path: Path) -> Path:
        while not path.exists():
            path = path.parent
        return path
