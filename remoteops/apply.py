"""Apply a bundle in place on the server, with backup, journal, ledger and rollback.

Runs inside the agent, on the server. Everything lives under
``<root>/.remoteops/``: ``lock``, ``journal.json``, ``ledger.jsonl``,
``current.json`` (the manifest of what is deployed), ``index.json`` (a stat
cache of hashes), ``incoming/`` (uploads), ``staging/`` and
``backups/<UTC stamp>-v<version>/`` (``backup.json`` plus ``files/``).

Order of a change: lock; finish or undo any interrupted change; stage and
verify the new content; write the backup (every file that will be overwritten
or deleted, plus the list of files that will be created) and only then the
journal; replace each file by temp file + rename; record the new state and the
ledger entry; drop the journal. A change killed at any point is undone by the
next command, so the tree is all old or all new.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Any

from remoteops import __version__
from remoteops.bundles import (CHUNK, BundleError, Manifest, iter_members, plan_between,
                               sha256_file)
from remoteops.errors import RemoteOpsError
from remoteops.locks import FileLock

STATE = ".remoteops"


class MissingMembers(BundleError):
    """The upload lacks files the server's plan needs (its files changed since the plan)."""


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, ensure_ascii=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
        """sha256 of each existing path, reusing the stat cache when size and mtime match.

        ``known``: hashes of files this process has just written and verified itself.
        """
        index = self._index()
        known = known or {}
        out: dict[str, str] = {}
        fresh: dict[str, list] = {}
        modes: dict[str, int] = {}
        root = str(self.root)
        for rel in paths:
            path = os.path.join(root, rel)
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            modes[rel] = st.st_mode & 0o7777
            cached = index.get(rel)
            if rel in known:
                out[rel] = known[rel]
            elif cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
                out[rel] = cached[2]
            else:
                out[rel] = sha256_file(Path(path))
            fresh[rel] = [st.st_size, st.st_mtime_ns, out[rel]]
        self._fresh_index = fresh
        self._modes = modes
        return out

    def _save_index(self, paths: list[str], known: dict[str, str] | None = None) -> None:
        self.hashes(paths, known)
        _write_json(self.state / "index.json", self._fresh_index)

    def ledger(self, entry: dict) -> None:
        entry = {"time": _now(), "user": getpass.getuser(), "host": socket.gethostname(),
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
        pending = self._pending_recovery()
        current = self.current()
        if pending is not None:  # plan against the tree as the next command will leave it
            before = pending[1]["manifest_before"]
            current = Manifest.from_json(json.dumps(before)) if before else None
        wanted = manifest.file_map()
        managed = sorted(set(wanted) | (set(current.file_map()) if current else set()))
        on_disk = self.hashes(managed)
        modes = dict(self._modes)
        if pending is not None:
            meta = pending[1]
            for record in meta["overwritten"] + meta["deleted"]:
                on_disk[record["path"]], modes[record["path"]] = record["sha256"], record["mode"]
            for rel in meta["created"]:
                on_disk.pop(rel, None)
        need = sorted(p for p, f in wanted.items()
                      if on_disk.get(p) != f.sha256 or modes.get(p) != f.mode)
        delete = sorted(p for p in on_disk if p not in wanted)
        free = self._free()
        return {"need": need, "delete": delete,
                "added": [p for p in need if p not in on_disk],
                "changed": [p for p in need if p in on_disk],
                "unchanged": len(wanted) - len(need), "free_bytes": free,
                "current_version": current.version if current else None,
                "current_content_id": current.content_id if current else None,
                "agent_version": __version__, "root": str(self.root),
                "recovery_pending": pending[1]["label"] if pending else None}

    def _pending_recovery(self) -> tuple[Path, dict] | None:
        """The backup of an interrupted change the next command will undo, if any."""
        journal_path = self.state / "journal.json"
        if not journal_path.is_file():
            return None
        backup = self.backups / json.loads(journal_path.read_text())["backup"]
        return backup, json.loads((backup / "backup.json").read_text())

    def _mode(self, rel: str) -> int | None:
        try:
            return (self.root / rel).stat().st_mode & 0o7777
        except FileNotFoundError:
            return None

    def _free(self) -> int:
        return shutil.disk_usage(self._existing_parent(self.root)).free

    @staticmethod
    def _existing_parent(path: Path) -> Path:
        while not path.exists():
            path = path.parent
        return path

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
        with self.lock(holder) as lock:
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
            staging = self.state / "staging" / manifest.content_id
            shutil.rmtree(staging, ignore_errors=True)
            try:
                try:
                    staged = self._stage(manifest, delta, plan["need"], staging, delta_sha256)
                except MissingMembers as exc:
                    if expect_base is None:
                        raise
                    return self._base_differs(str(exc))
                needed = manifest.file_map()
                self._check_space(sum(needed[p].size for p in plan["need"]),
                                  plan["changed"] + plan["delete"])
                changes = {p: (staged[p], needed[p].mode) for p in plan["need"]}
                changes.update({p: None for p in plan["delete"]})
                if not changes:
                    return {"action": "apply", "noop": True, "version": manifest.version,
                            "recovered": recovered, "broken_lock": lock.broken,
                            "free_bytes": self._free()}
                result = self._commit(changes, kind="apply", version=manifest.version,
                                      after=json.loads(manifest.to_json()),
                                      label=f"v{manifest.version}",
                                      staged={p: needed[p].sha256 for p in plan["need"]})
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

    def _stage(self, manifest: Manifest, delta: Path | None, need: list[str], staging: Path,
               delta_sha256: str | None) -> dict[str, Path]:
        """Extract and verify every needed file into ``staging`` before touching the tree."""
        if not need:
            return {}
        if delta is None or not delta.is_file():
            raise BundleError("the upload of changed files is missing on the server; run the "
                              "deploy again.")
        if delta_sha256 and sha256_file(delta) != delta_sha256:
            delta.unlink()
            raise BundleError("the uploaded bundle does not match its sha256 (damaged in "
                              "transit); nothing was changed: run the deploy again.")
        wanted = manifest.file_map()
        needed = set(need)
        toolkit = f"toolkit/{manifest.toolkit_wheel['name']}"
        staged: dict[str, Path] = {}
        for member, fh in iter_members(delta):
            if fh is None or member.name == toolkit:  # the upload may be the whole bundle
                continue
            rel = member.name[len("files/"):] if member.name.startswith("files/") else None
            if rel not in wanted:
                raise BundleError(f"the upload holds {member.name}, which the manifest does not "
                                  "list; refusing it (nothing was changed).")
            if rel not in needed:
                continue  # the server has it already
            out = staging / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with open(out, "wb") as dst:
                for chunk in iter(lambda: fh.read(CHUNK), b""):
                    h.update(chunk)
                    dst.write(chunk)
            if h.hexdigest() != wanted[rel].sha256:
                raise BundleError(f"{rel} in the upload does not match its sha256 (tampered or "
                                  "damaged); nothing was changed: rebuild and deploy again.")
            staged[rel] = out
        missing = [p for p in need if p not in staged]
        if missing:
            raise MissingMembers(f"the server's files changed since the plan ({missing[0]} and "
                                 f"{len(missing) - 1} more are not in the upload); run the "
                                 "deploy again.")
        return staged

    def _check_space(self, new_bytes: int, backed_up: list[str]) -> None:
        backup = sum((self.root / p).stat().st_size for p in backed_up
                     if (self.root / p).is_file())
        free = shutil.disk_usage(self._existing_parent(self.root)).free
        need = new_bytes + backup + (16 << 20)
        if free < need:
            raise RemoteOpsError(f"not enough disk on the server: {free / 1e9:.2f} GB free, the "
                                 f"apply needs {need / 1e9:.2f} GB (new files and backups); free "
                                 "space or lower deploy.keep_backups. Nothing was changed.")

    # -- the change itself ---------------------------------------------------------------
    def _commit(self, changes: dict[str, tuple[Path, int] | None], kind: str, version: int,
                after: dict | None, label: str, extra: dict | None = None,
                staged: dict[str, str] | None = None) -> dict:
        """Back up, journal, replace, record. ``changes``: path -> (source, mode) or None.

        ``staged``: path -> sha256 of sources that are verified staging copies of this
        change; they are renamed into place rather than copied.
        """
        staged = staged or {}
        name = f"{_stamp()}-{label}"
        backup = self.backups / name
        n = 1
        while backup.exists():
            n += 1
            backup = self.backups / f"{name}.{n}"
        files_dir = backup / "files"
        current = self.current()
        before = json.loads(current.to_json()) if current else None
        on_disk = self.hashes(sorted(changes))
        overwritten, deleted, created = [], [], []
        for rel in sorted(changes):
            path = self.root / rel
            if rel in on_disk:
                copy = files_dir / rel
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, copy)
                record = {"path": rel, "sha256": on_disk[rel], "size": path.stat().st_size,
                          "mode": path.stat().st_mode & 0o7777}
                (deleted if changes[rel] is None else overwritten).append(record)
            elif changes[rel] is not None:
                created.append(rel)
        meta = {"kind": kind, "label": label, "version": version, "created_at": _now(),
                "overwritten": overwritten, "deleted": deleted, "created": created,
                "manifest_before": before, "manifest_after": after, **(extra or {})}
        _write_json(backup / "backup.json", meta)  # the backup is complete from here on
        _write_json(self.state / "journal.json", {"backup": backup.name, "kind": kind,
                                                  "started": _now(), "pid": os.getpid()})
        for rel, change in sorted(changes.items()):
            path = self.root / rel
            if change is None:
                path.unlink(missing_ok=True)
                self._prune_dirs(path.parent)
                continue
            source, mode = change
            self._place(source, path, mode, move=rel in staged)
            self._fault_point()
        self._finish(after, sorted(changes), staged)
        self.ledger({"action": kind, "version": version, "label": label, "backup": backup.name,
                     "overwritten": len(overwritten), "deleted": len(deleted),
                     "created": len(created), **(extra or {})})
        (self.state / "journal.json").unlink()
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

    def _place(self, source: Path, dest: Path, mode: int, move: bool = False) -> None:
        """Put ``source`` at ``dest`` atomically (temp file + rename).

        ``move``: ``source`` is a staging copy, itself the temp file: rename it into place
        (same file system), falling back to a copy.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir() and not dest.is_symlink():
            raise RemoteOpsError(f"{dest} is a folder on the server but a file in the bundle; "
                                 "move it away and deploy again.")
        if move:
            try:
                os.chmod(source, mode)
                os.replace(source, dest)
                return
            except OSError:
                pass  # another file system: copy below
        tmp = dest.with_name(f".{dest.name}.remoteops-tmp")
        shutil.copyfile(source, tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)

    def _prune_dirs(self, folder: Path) -> None:
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

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
            for record in meta["overwritten"] + meta["deleted"] + [{"path": p}
                                                                    for p in meta["created"]]:
                dest = self.root / record["path"]
                dest.with_name(f".{dest.name}.remoteops-tmp").unlink(missing_ok=True)
            restored = self._restore_from(backup, meta)
            self._finish(meta["manifest_before"], restored)
            self.ledger({"action": "recover", "undone": meta["kind"], "label": meta["label"],
                         "backup": backup.name, "restored": len(restored)})
            journal_path.unlink()
            shutil.rmtree(backup, ignore_errors=True)  # it described a change that never was
            result = {"undone": meta["kind"], "label": meta["label"], "files": len(restored)}
        if self.backups.is_dir():
            for folder in self.backups.iterdir():
                if folder.is_dir() and not (folder / "backup.json").is_file():
                    shutil.rmtree(folder, ignore_errors=True)
        return result

    def _restore_from(self, backup: Path, meta: dict) -> list[str]:
        """Put back every file the backup holds; remove files the change created."""
        touched = []
        for record in meta["overwritten"] + meta["deleted"]:
            source = backup / "files" / record["path"]
            if sha256_file(source) != record["sha256"]:
                raise RemoteOpsError(f"backup file {source} does not match its recorded sha256; "
                                     "the backup is damaged, restore that file by hand.")
            self._place(source, self.root / record["path"], record["mode"])
            touched.append(record["path"])
        for rel in meta["created"]:
            path = self.root / rel
            path.unlink(missing_ok=True)
            self._prune_dirs(path.parent)
            touched.append(rel)
        return touched

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

    def rollback_plan(self, name: str) -> dict:
        backup = self.resolve_backup(name)
        meta = json.loads((backup / "backup.json").read_text())
        return {"backup": backup.name, "restore": [r["path"] for r in meta["overwritten"] +
                                                   meta["deleted"]],
                "remove": list(meta["created"]), "label": meta["label"],
                "to_version": (meta["manifest_before"] or {}).get("version")}

    def rollback(self, name: str, holder: str, keep: int = 10) -> dict:
        with self.lock(holder) as lock:
            recovered = self.recover()
            backup = self.resolve_backup(name)
            meta = json.loads((backup / "backup.json").read_text())
            changes: dict[str, tuple[Path, int] | None] = {}
            for record in meta["overwritten"] + meta["deleted"]:
                source = backup / "files" / record["path"]
                if sha256_file(source) != record["sha256"]:
                    raise RemoteOpsError(f"backup file {source} does not match its recorded "
                                         "sha256; the backup is damaged. Nothing was changed.")
                changes[record["path"]] = (source, record["mode"])
            for rel in meta["created"]:
                changes[rel] = None
            before = meta["manifest_before"]
            version = (before or {}).get("version") or 0
            result = self._commit(changes, kind="rollback", version=version, after=before,
                                  label=f"rollback-to-v{version}",
                                  extra={"rolled_back": backup.name})
            verified = self._verify_rollback(meta)
            pruned = self.prune(keep)
            return {**result, "verified": verified, "recovered": recovered, "pruned": pruned,
                    "broken_lock": lock.broken}

    def _verify_rollback(self, meta: dict) -> int:
        expect = {r["path"]: r["sha256"] for r in meta["overwritten"] + meta["deleted"]}
        actual = self.hashes(sorted(expect) + meta["created"])
        wrong = [p for p, h in expect.items() if actual.get(p) != h]
        wrong += [p for p in meta["created"] if p in actual]
        if wrong:
            raise RemoteOpsError(f"after the rollback {wrong[0]} is not as the backup recorded; "
                                 "check the disk and run the rollback again.")
        return len(expect) + len(meta["created"])

    # -- listing and pruning -------------------------------------------------------------
    def list_backups(self) -> list[dict]:
        if not self.backups.is_dir():
            return []
        out = []
        for folder in sorted(self.backups.iterdir()):
            meta_path = folder / "backup.json"
            if not meta_path.is_file():
                continue
            meta = json.loads(meta_path.read_text())
            files = meta["overwritten"] + meta["deleted"]
            out.append({"name": folder.name, "path": str(folder), "kind": meta["kind"],
                        "version": meta["version"], "created_at": meta["created_at"],
                        "files": len(files) + len(meta["created"]),
                        "size": sum(r["size"] for r in files),
                        "from_version": (meta["manifest_before"] or {}).get("version"),
                        "current": False})
        if out:
            out[-1]["current"] = True  # undoes what is deployed now
        return out

    def prune(self, keep: int) -> list[str]:
        backups = self.list_backups()
        doomed = backups[:-keep] if keep > 0 else []
        for b in doomed:
            shutil.rmtree(b["path"], ignore_errors=True)
        return [b["name"] for b in doomed]


# How long the agent waits for a manifest the laptop is still uploading: the deploy
# starts the agent and sends the manifest at the same time (two login-shell starts
# overlap instead of adding up).
MANIFEST_WAIT_SECONDS = 30.0


def _wait_for_upload(path: Path, seconds: float) -> None:
    """Wait until ``path`` appears (an atomic rename by the uploader), or give up.

    Only for files under ``<root>/.remoteops/incoming/``; stops early when the SSH
    session that started us is gone (we were re-parented). While ``<path>.part`` (a
    resumable upload) keeps growing, the wait goes on: ``seconds`` counts from the
    last growth.
    """
    if path.parent.name != "incoming" or path.parent.parent.name != STATE:
        return
    parent = os.getppid()
    part = path.with_name(path.name + ".part")
    deadline = time.monotonic() + seconds
    delay = 0.005
    seen = None
    while not path.is_file() and time.monotonic() < deadline and os.getppid() == parent:
        try:
            size = part.stat().st_size
        except FileNotFoundError:
            size = None
        if size is not None and size != seen:
            seen = size
            deadline = time.monotonic() + seconds
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)


def wait_for_delta(path: Path, seconds: float = MANIFEST_WAIT_SECONDS) -> None:
    """Wait for an upload the laptop sends while the agent starts (see _wait_for_upload)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        _wait_for_upload(path, seconds)


def read_manifest_file(path: str | Path, wait: float = MANIFEST_WAIT_SECONDS) -> Manifest:
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file() and wait > 0:
        _wait_for_upload(path, wait)
    if not path.is_file():
        raise BundleError(f"manifest {path} is not on the server; run the deploy again.")
    return Manifest.from_json(path.read_text(encoding="utf-8"))
