"""Apply a bundle in place on the server, with backup, journal, ledger and rollback.

Runs inside the agent, on the server. Everything lives under
``<root>/.remoteops/``: ``lock``, ``journal.json``, ``ledger.jsonl``,
``current.json`` (the manifest of what is deployed), ``index.json`` (a stat
cache of hashes), ``incoming/`` (uploads), ``staging/`` and
``backups/<UTC stamp>-<label>/`` (``backup.json`` plus ``files/``), ordered by
the sequence number in ``backup.json`` (see ``remoteops.server.backupset``).

Order of a change: lock; finish or undo any interrupted change; check the disk
has room for the new files uncompressed plus the backups; stage and verify the
new content; refuse anything in the way that the change does not manage; write
the backup (every file or link that will be overwritten or deleted, plus the
list of paths that will be created) and only then the journal, each fsynced;
remove paths deepest first, then place each file by temp file + rename
(``remoteops.server.applyplan``); fsync the folders; record the new state and the
ledger entry; drop the journal. A change killed at any point is undone by the
next command, so the tree is all old or all new.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import stat
from pathlib import Path
from typing import Any

from remoteops import __version__
from remoteops.server.applyplan import (LINK_MODE, Put, clear_dirs, conflict, copy_synced, displace,
                                 link_digest, order, place, prune_dirs, remove)
from remoteops.server.backupset import SEQ_FILE, catalogue, chain, compose, next_seq, read_backup
from remoteops.common.manifest import BundleError, Manifest, plan_between
from remoteops.common.clock import now_iso, utc_stamp
from remoteops.common.files import fsync_dirs, sha256_file, temp_name, write_atomic_json
from remoteops.common.errors import RemoteOpsError
from remoteops.server.incoming import (MANIFEST_WAIT_SECONDS, MissingMembers,  # noqa: F401 - re-exported
                                read_manifest_file, stage, wait_for_delta)
from remoteops.common.locks import FileLock
from remoteops.common.runs import refuse_if_live
from remoteops.common.paths import UnsafePath, ancestors, canonical, check_tree, link_of

STATE = ".remoteops"
HEADROOM = 16 << 20  # bytes left free besides what an apply writes


def _write_json(path: Path, data: Any) -> None:
    write_atomic_json(path, data, indent=1, ensure_ascii=False, newline=False)


def check_manifest(manifest: Manifest) -> None:
    """Every path of a manifest normalised, inside the root, and forming a tree."""
    try:
        check_tree([(f.path, link_of(f)) for f in manifest.files], "the bundle manifest")
    except UnsafePath as exc:
        raise BundleError(str(exc)) from None


class Project:
    """The deployed project root on this machine and its ``.remoteops`` state."""

    def __init__(self, root: str | Path):
        self.root = Path(os.path.expanduser(str(root))).resolve()
        self.state = self.root / STATE
        self.backups = self.state / "backups"

    # -- state files ---------------------------------------------------------------------
    def current(self) -> Manifest | None:
        path = self.state / "current.json"
        return Manifest.from_json(path.read_text()) if path.is_file() else None

    def _index(self) -> dict[str, list]:
        try:
            return json.loads((self.state / "index.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def hashes(self, paths: list[str], known: dict[str, str] | None = None) -> dict[str, str]:
        """sha256 of each existing file (a link: ``link_digest``), reusing the stat cache
        while size, mtime, ctime and inode all match, as the laptop's cache does: an edit
        that keeps size and mtime (``cp -p``, ``touch -r``) still changes the ctime.

        ``known``: hashes of files this process has just written and verified itself.
        """
        index = self._index()
        known = known or {}
        out: dict[str, str] = {}
        fresh: dict[str, list] = {}
        modes: dict[str, int] = {}
        links: set[str] = set()
        root = str(self.root)
        for rel in paths:
            path = os.path.join(root, rel)
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISLNK(st.st_mode):
                out[rel], modes[rel] = link_digest(os.readlink(path)), LINK_MODE
                links.add(rel)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            modes[rel] = st.st_mode & 0o7777
            key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            cached = index.get(rel)
            if rel in known:
                out[rel] = known[rel]
            elif isinstance(cached, list) and len(cached) == 5 and cached[:4] == key:
                out[rel] = cached[4]
            else:
                out[rel] = sha256_file(Path(path))
            fresh[rel] = key + [out[rel]]
        self._fresh_index, self._modes, self._links = fresh, modes, links
        return out

    def _save_index(self, paths: list[str], known: dict[str, str] | None = None) -> None:
        self.hashes(paths, known)
        _write_json(self.state / "index.json", self._fresh_index)

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

    # -- planning ------------------------------------------------------------------------
    def plan(self, manifest: Manifest) -> dict:
        """What the disk needs to become ``manifest``: paths to send, paths to delete."""
        check_manifest(manifest)
        pending = self._pending_recovery()
        current = self.current()
        if pending is not None:  # plan against the tree as the next command will leave it
            before = pending[1]["manifest_before"]
            current = Manifest.from_json(json.dumps(before)) if before else None
        wanted = manifest.file_map()
        managed = sorted(set(wanted) | (set(current.file_map()) if current else set()))
        on_disk = self.hashes(managed)
        modes, links = dict(self._modes), set(self._links)
        sizes = {rel: f[0] for rel, f in self._fresh_index.items()}
        if pending is not None:
            meta = pending[1]
            for record in meta["overwritten"] + meta["deleted"]:
                rel = record["path"]
                on_disk[rel], modes[rel], sizes[rel] = (record["sha256"], record["mode"],
                                                        record["size"])
                (links.add if record.get("link") is not None else links.discard)(rel)
            for rel in meta["created"]:
                on_disk.pop(rel, None)
        need = sorted(p for p, f in wanted.items()
                      if on_disk.get(p) != f.sha256 or modes.get(p) != f.mode
                      or (p in links) != (link_of(f) is not None))
        delete = sorted(p for p in on_disk if p not in wanted)
        changed = [p for p in need if p in on_disk]
        return {"need": need, "delete": delete,
                "added": [p for p in need if p not in on_disk], "changed": changed,
                "unchanged": len(wanted) - len(need), "free_bytes": self._free(),
                "need_bytes": sum(wanted[p].size for p in need),
                "backup_bytes": sum(sizes.get(p, 0) for p in changed + delete),
                "current_version": current.version if current else None,
                "current_content_id": current.content_id if current else None,
                "agent_version": __version__, "root": str(self.root),
                "recovery_pending": pending[1]["label"] if pending else None}

    def _pending_recovery(self) -> tuple[Path, dict] | None:
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

    def _free(self) -> int:
        return shutil.disk_usage(self._existing_parent(self.root)).free

    @staticmethod
    def _existing_parent(path: Path) -> Path:
        while not path.exists():
            path = path.parent
        return path

    def _check_space(self, plan: dict) -> None:
        """Room for the new files uncompressed (staged) and the backups, before staging."""
        need = plan["need_bytes"] + plan["backup_bytes"] + HEADROOM
        free = self._free()
        if free < need:
            raise RemoteOpsError(f"not enough disk on the server: {free / 1e9:.2f} GB free, the "
                                 f"apply needs {need / 1e9:.2f} GB (new files uncompressed and "
                                 "backups); free space or lower deploy.keep_backups. Nothing was "
                                 "changed.")

    # -- apply ---------------------------------------------------------------------------
    def apply(self, manifest: Manifest, delta: Path | None, holder: str, keep: int = 10,
              delta_sha256: str | None = None, expect_base: str | None = None,
              expect_agent: str | None = None) -> dict:
        """Apply ``manifest``; every answer carries ``free_bytes`` (after the change).

        ``expect_base``: the content id the laptop believes is deployed here (it planned
        locally from it). When this root is not exactly that (another content id, files
        changed by hand, an interrupted change pending, an upload lacking a needed file)
        nothing is applied and the answer says ``base_differs`` with the reason: the
        laptop then plans against the server as usual.
        """
        check_manifest(manifest)
        with self.lock(holder) as lock:
            refuse_if_live(self.root, "deploying")  # a live run reads these files
            if expect_base is not None:
                reason = self._base_check(expect_base, expect_agent)
                if reason:
                    return self._base_differs(reason)
            recovered = self.recover()
            plan = self.plan(manifest)
            if expect_base is not None:
                reason = self._plan_check(manifest, plan)
                if reason:
                    return self._base_differs(reason)
            self._check_space(plan)
            staging = self.state / "staging" / manifest.content_id
            shutil.rmtree(staging, ignore_errors=True)
            try:
                try:
                    staged = stage(manifest, delta, plan["need"], staging, delta_sha256)
                except MissingMembers as exc:
                    if expect_base is None:
                        raise
                    return self._base_differs(str(exc))
                needed = manifest.file_map()
                changes: dict[str, Put | None] = {}
                for p in plan["need"]:
                    entry = needed[p]
                    changes[p] = (Put(None, entry.mode, link_of(entry)) if link_of(entry) is not None
                                  else Put(staged[p], entry.mode, move=True))
                changes.update({p: None for p in plan["delete"]})
                if not changes:
                    return {"action": "apply", "noop": True, "version": manifest.version,
                            "recovered": recovered, "broken_lock": lock.broken,
                            "free_bytes": self._free()}
                result = self._commit(changes, kind="apply", version=manifest.version,
                                      after=json.loads(manifest.to_json()),
                                      label=f"v{manifest.version}",
                                      known={p: needed[p].sha256 for p in plan["need"]})
            finally:
                shutil.rmtree(staging.parent, ignore_errors=True)
            pruned = self.prune(keep)
            return {**result, "recovered": recovered, "pruned": pruned,
                    "broken_lock": lock.broken, "free_bytes": self._free()}

    def _base_check(self, expect_base: str, expect_agent: str | None) -> str | None:
        """Why this root is not the base the laptop planned from (None: it is)."""
        if expect_agent and expect_agent != __version__:
            return f"its agent is remoteops {__version__}, the bundle carries {expect_agent}"
        pending = self._pending_recovery()
        if pending is not None:
            return f"an interrupted change ({pending[1]['label']}) is to be undone first"
        current = self.current()
        if current is None:
            return "nothing is recorded as deployed there"
        if current.content_id != expect_base:
            return (f"it has v{current.version} ({current.content_id[:12]}), not "
                    f"{expect_base[:12]}")
        return None

    def _plan_check(self, manifest: Manifest, plan: dict) -> str | None:
        """Why the disk's plan differs from the plan between the recorded manifests."""
        expected = plan_between(self.current(), manifest)
        if all(plan[k] == expected[k] for k in ("need", "delete", "added", "changed")):
            return None
        ours = set(plan["need"] + plan["delete"])
        odd = sorted(ours ^ set(expected["need"] + expected["delete"])
                     or set(plan["added"]) ^ set(expected["added"]))
        return (f"{len(odd)} file(s) there differ from what was deployed"
                + (f" ({odd[0]}{' and more' if len(odd) > 1 else ''})" if odd else ""))

    def _base_differs(self, reason: str) -> dict:
        current = self.current()
        return {"action": "apply", "base_differs": True, "reason": reason, "noop": True,
                "current_content_id": current.content_id if current else None,
                "agent_version": __version__, "free_bytes": self._free()}

    # -- the change itself ---------------------------------------------------------------
    def _commit(self, changes: dict[str, Put | None], kind: str, version: int,
                after: dict | None, label: str, extra: dict | None = None,
                known: dict[str, str] | None = None) -> dict:
        """Back up, journal, replace, record. ``changes``: path -> Put, or None to remove.

        ``known``: path -> sha256 of content this process verified (no need to hash again).
        """
        reason = conflict(self.root, changes)
        if reason:
            raise RemoteOpsError(f"{reason}. Nothing was changed.")
        seq = next_seq(self.state, self.backups)
        name = f"{utc_stamp()}-{label}"
        backup = self.backups / name
        n = 1
        while backup.exists():
            n += 1
            backup = self.backups / f"{name}.{n}"
        files_dir = backup / "files"
        current = self.current()
        before = json.loads(current.to_json()) if current else None
        on_disk = self.hashes(sorted(changes))
        modes, links = self._modes, self._links
        overwritten, deleted, created = [], [], []
        folders = {self.backups, backup}
        for rel in sorted(changes):
            path = self.root / rel
            if rel in on_disk:
                copy = files_dir / rel
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy_synced(path, copy)
                folders |= {copy.parent} | ancestors(copy.parent, backup)
                record = {"path": rel, "sha256": on_disk[rel], "size": os.lstat(path).st_size,
                          "mode": modes[rel]}
                if rel in links:
                    record["link"] = os.readlink(path)
                (deleted if changes[rel] is None else overwritten).append(record)
            elif changes[rel] is not None:
                created.append(rel)
        fsync_dirs(folders)  # every copy is durable before backup.json says it exists
        meta = {"kind": kind, "label": label, "version": version, "seq": seq,
                "created_at": now_iso(), "overwritten": overwritten, "deleted": deleted,
                "created": created, "manifest_before": before, "manifest_after": after,
                **(extra or {})}
        _write_json(self.state / SEQ_FILE, seq)
        _write_json(backup / "backup.json", meta)  # the backup is complete from here on
        _write_json(self.state / "journal.json", {"backup": backup.name, "kind": kind,
                                                  "started": now_iso(), "pid": os.getpid()})
        removals, puts = order(changes)
        touched: set[Path] = {self.root}
        for rel in removals:
            path = self.root / rel
            remove(path)
            prune_dirs(path.parent, self.root)
            touched |= ancestors(path, self.root)
        for rel in puts:
            path = self.root / rel
            if not clear_dirs(path):
                raise RemoteOpsError(f"{path} is a folder that is not empty; move it away and "
                                     "run the command again (the change will be undone).")
            place(changes[rel], path)
            touched |= ancestors(path, self.root)
            self._fault_point()
        fsync_dirs(touched)  # the new names are durable before the journal goes
        self._finish(after, sorted(changes), known)
        self.ledger({"action": kind, "version": version, "label": label, "backup": backup.name,
                     "overwritten": len(overwritten), "deleted": len(deleted),
                     "created": len(created), **(extra or {})})
        (self.state / "journal.json").unlink()
        fsync_dirs([self.state])
        return {"action": kind, "noop": False, "version": version, "backup": str(backup),
                "backup_name": backup.name, "overwritten": len(overwritten),
                "deleted": len(deleted), "created": len(created)}

    def _fault_point(self) -> None:
        """Fault injection for the test suite: a real SIGKILL after N files are placed."""
        limit = os.environ.get("REMOTEOPS_TEST_KILL_AFTER_FILES")
        if limit is not None:
            self._placed = getattr(self, "_placed", 0) + 1
            if self._placed >= int(limit):
                os.kill(os.getpid(), 9)

    def _finish(self, after: dict | None, touched: list[str],
                known: dict[str, str] | None = None) -> None:
        if after is None:
            (self.state / "current.json").unlink(missing_ok=True)
        else:
            _write_json(self.state / "current.json", after)
        keep = sorted(set(touched) | {f["path"] for f in (after or {}).get("files", [])})
        self._save_index(keep, known)

    # -- recovery ------------------------------------------------------------------------
    def recover(self) -> dict | None:
        """Undo an interrupted change (all old again); drop half-written backups."""
        journal_path = self.state / "journal.json"
        result = None
        pending = self._pending_recovery()
        if pending is not None:
            backup, meta = pending
            for rel in [r["path"] for r in meta["overwritten"] + meta["deleted"]] + \
                    meta["created"]:
                dest = self.root / rel
                try:
                    (dest.parent / temp_name(dest.name)).unlink(missing_ok=True)
                except (NotADirectoryError, IsADirectoryError):
                    pass  # a file or folder where the parent was: undone below
            restored, displaced = self._restore_from(backup, meta)
            self._finish(meta["manifest_before"], restored)
            self.ledger({"action": "recover", "undone": meta["kind"], "label": meta["label"],
                         "backup": backup.name, "restored": len(restored),
                         "displaced": [str(p) for p in displaced]})
            journal_path.unlink()
            fsync_dirs([self.state])
            shutil.rmtree(backup, ignore_errors=True)  # it described a change that never was
            result = {"undone": meta["kind"], "label": meta["label"], "files": len(restored)}
            if displaced:
                result["displaced"] = [str(p) for p in displaced]
        if self.backups.is_dir():
            for folder in self.backups.iterdir():
                if folder.is_dir() and not (folder / "backup.json").is_file():
                    shutil.rmtree(folder, ignore_errors=True)
        return result

    @staticmethod
    def _check_copy(source: Path, record: dict, consequence: str) -> None:
        try:
            actual = (link_digest(os.readlink(source)) if record.get("link") is not None
                      else sha256_file(source))
        except OSError:
            actual = None
        if actual != record["sha256"]:
            raise RemoteOpsError(f"backup file {source} does not match its recorded sha256; the "
                                 f"backup is damaged. {consequence}")

    def _restore_from(self, backup: Path, meta: dict) -> tuple[list[str], list[Path]]:
        """Put back every file the backup holds; remove paths the change created.

        Never stuck: whatever else stands where a file goes (a folder that is not
        empty, a file where a folder goes) is moved to ``.remoteops/displaced/``.
        """
        touched: list[str] = []
        displaced: list[Path] = []
        folders: set[Path] = {self.root}
        for rel in sorted(meta["created"], key=lambda p: (-p.count("/"), p)):
            path = self.root / rel
            remove(path)  # a folder there is the one the change was to replace: kept
            prune_dirs(path.parent, self.root)
            folders |= ancestors(path, self.root)
            touched.append(rel)
        records = sorted(meta["overwritten"] + meta["deleted"],
                         key=lambda r: (r["path"].count("/"), r["path"]))
        for record in records:
            rel = record["path"]
            source = backup / "files" / rel
            self._check_copy(source, record, "Restore that file by hand.")
            parts = rel.split("/")
            for i in range(1, len(parts)):
                above = self.root.joinpath(*parts[:i])
                if (above.is_symlink() or above.exists()) and not above.is_dir():
                    displaced.append(displace(self.root, "/".join(parts[:i]),
                                              self.state / "displaced"))
            dest = self.root / rel
            if not clear_dirs(dest):
                displaced.append(displace(self.root, rel, self.state / "displaced"))
            place(Put(source, record["mode"], record.get("link")), dest)
            folders |= ancestors(dest, self.root)
            touched.append(rel)
        fsync_dirs(folders)
        return touched, displaced

    # -- rollback ------------------------------------------------------------------------
    def resolve_backup(self, name: str) -> Path:
        path = Path(os.path.expanduser(name))
        candidate = path if path.is_absolute() else self.backups / name
        if not (candidate / "backup.json").is_file():
            known = ", ".join(b["name"] for b in self.list_backups()[-3:]) or "none yet"
            raise RemoteOpsError(f"no backup {name!r} under {self.backups}; 'invoke backups' "
                                 f"lists them (latest: {known}).")
        if self.backups.resolve() not in candidate.resolve().parents:
            raise RemoteOpsError(f"{name} is not a backup of {self.root}; pick one from "
                                 "'invoke backups'.")
        return candidate

    def _walk(self, name: str) -> tuple[list[tuple[Path, dict]], dict]:
        """The backups a rollback to ``name`` undoes (oldest first) and what it restores.

        A backup that is not the latest is reached by walking back through every later
        one, so the tree becomes exactly what it was before ``name``'s change.
        """
        backup = self.resolve_backup(name)
        pending = self._pending_recovery()
        current = self.current()
        current_id = current.content_id if current else None
        skip = None
        if pending is not None:  # a dry run: as the recovery the rollback runs first leaves it
            skip = pending[0].name
            current_id = (pending[1]["manifest_before"] or {}).get("content_id")
            if backup.name == skip:
                raise RemoteOpsError(f"{name} is the backup of an interrupted change, which "
                                     "the next command undoes; roll back to an earlier one.")
        picked = chain(self.backups, backup, current_id, skip)
        return picked, compose(picked)

    def rollback_plan(self, name: str) -> dict:
        picked, composed = self._walk(name)
        meta = picked[0][1]
        return {"backup": picked[0][0].name,
                "restore": sorted(p for p, found in composed.items() if found is not None),
                "remove": sorted(p for p, found in composed.items() if found is None),
                "label": meta["label"], "through": [f.name for f, _ in picked[1:]],
                "to_version": (meta["manifest_before"] or {}).get("version")}

    def rollback(self, name: str, holder: str, keep: int = 10) -> dict:
        with self.lock(holder) as lock:
            refuse_if_live(self.root, "rolling back")  # a live run reads these files
            recovered = self.recover()
            picked, composed = self._walk(name)
            changes: dict[str, Put | None] = {}
            for rel, found in composed.items():
                if found is None:
                    changes[rel] = None
                    continue
                folder, record = found
                source = folder / "files" / rel
                self._check_copy(source, record, "Nothing was changed.")
                changes[rel] = Put(source, record["mode"], record.get("link"))
            before = picked[0][1]["manifest_before"]
            version = (before or {}).get("version") or 0
            extra: dict = {"rolled_back": picked[0][0].name}
            if len(picked) > 1:
                extra["walked_back"] = [f.name for f, _ in picked[1:]]
            result = self._commit(changes, kind="rollback", version=version, after=before,
                                  label=f"rollback-to-v{version}", extra=extra)
            verified = self._verify_rollback(composed)
            pruned = self.prune(keep)
            return {**result, "verified": verified, "recovered": recovered, "pruned": pruned,
                    "broken_lock": lock.broken, **extra}

    def _verify_rollback(self, composed: dict) -> int:
        expect = {p: found[1]["sha256"] for p, found in composed.items() if found is not None}
        gone = [p for p, found in composed.items() if found is None]
        actual = self.hashes(sorted(expect) + gone)
        wrong = [p for p, h in expect.items() if actual.get(p) != h]
        wrong += [p for p in gone if p in actual]
        if wrong:
            raise RemoteOpsError(f"after the rollback {wrong[0]} is not as the backup recorded; "
                                 "check the disk and run the rollback again.")
        return len(composed)

    # -- listing and pruning -------------------------------------------------------------
    def list_backups(self) -> list[dict]:
        """Backups oldest first by sequence number; the last undoes what is deployed now."""
        out = []
        for folder, meta in catalogue(self.backups):
            try:
                files = meta["overwritten"] + meta["deleted"]
                out.append({"name": folder.name, "path": str(folder), "kind": meta["kind"],
                            "version": meta["version"], "seq": meta.get("seq"),
                            "created_at": meta["created_at"],
                            "files": len(files) + len(meta["created"]),
                            "size": sum(r["size"] for r in files),
                            "from_version": (meta["manifest_before"] or {}).get("version"),
                            "current": False})
            except (KeyError, TypeError, AttributeError):
                continue  # damaged metadata: not offered
        if out:
            out[-1]["current"] = True
        return out

    def prune(self, keep: int) -> list[str]:
        backups = self.list_backups()
        doomed = backups[:-keep] if keep > 0 else []
        for b in doomed:
            shutil.rmtree(b["path"], ignore_errors=True)
        return [b["name"] for b in doomed]
