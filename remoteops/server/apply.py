"""Apply a bundle in place on the server: plan, stage, then one journaled change.

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

Where each part lives: the state files (``remoteops.server.projectroot``), the
change and its undo (``remoteops.server.journal``), rollback
(``remoteops.server.rollback``), the backups' order and listing
(``remoteops.server.backupset``). ``Project`` is the one face the agent's
commands use for all of them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from remoteops import __version__
from remoteops.common.errors import RemoteOpsError
from remoteops.common.manifest import DISK_HEADROOM, BundleError, Manifest, plan_between
from remoteops.common.paths import UnsafePath, check_tree, link_of
from remoteops.common.runs import refuse_if_live
from remoteops.server import journal, rollback
from remoteops.server.applyplan import Put
from remoteops.server.backupset import list_backups, prune
from remoteops.server.incoming import MissingMembers, stage
from remoteops.server.projectroot import ProjectRoot



def check_manifest(manifest: Manifest) -> None:
    """Every path of a manifest normalised, inside the root, and forming a tree."""
    try:
        check_tree([(f.path, link_of(f)) for f in manifest.files], "the bundle manifest")
    except UnsafePath as exc:
        raise BundleError(str(exc)) from None


def _as_undone(meta: dict, on_disk: dict[str, str], modes: dict[str, int],
               sizes: dict[str, int], links: set[str]) -> None:
    """The disk as recovering from the interrupted change ``meta`` will leave it."""
    for record in meta["overwritten"] + meta["deleted"]:
        rel = record["path"]
        on_disk[rel], modes[rel], sizes[rel] = record["sha256"], record["mode"], record["size"]
        (links.add if record.get("link") is not None else links.discard)(rel)
    for rel in meta["created"]:
        on_disk.pop(rel, None)


def _changes(manifest: Manifest, plan: dict, staged: dict[str, Path]) -> dict[str, Put | None]:
    """The change that makes the disk ``manifest``: staged files moved in, links made,
    paths it no longer has removed."""
    needed = manifest.file_map()
    changes: dict[str, Put | None] = {}
    for p in plan["need"]:
        entry = needed[p]
        changes[p] = (Put(None, entry.mode, link_of(entry)) if link_of(entry) is not None
                      else Put(staged[p], entry.mode, move=True))
    changes.update({p: None for p in plan["delete"]})
    return changes


class Project(ProjectRoot):
    """The deployed project root on this machine: plan and apply a bundle here, and (each
    in its own module) recover, roll back, list and prune backups."""

    # -- planning ------------------------------------------------------------------------
    def plan(self, manifest: Manifest, checked: bool = False) -> dict:
        """What the disk needs to become ``manifest``: paths to send, paths to delete.
        ``checked``: ``check_manifest`` already passed for it."""
        if not checked:
            check_manifest(manifest)
        pending = self.pending_recovery()
        current = self.current()
        if pending is not None:  # plan against the tree as the next command will leave it
            before = pending[1]["manifest_before"]
            current = Manifest.from_data(before) if before else None
        wanted = manifest.file_map()
        managed = sorted(set(wanted) | (set(current.file_map()) if current else set()))
        scan = self._scanned = self.scan(managed)
        on_disk, modes, links = scan.hashes, dict(scan.modes), set(scan.links)
        sizes = {rel: f[0] for rel, f in scan.index.items()}
        if pending is not None:
            _as_undone(pending[1], on_disk, modes, sizes, links)
        need = sorted(p for p, f in wanted.items()
                      if on_disk.get(p) != f.sha256 or modes.get(p) != f.mode
                      or (p in links) != (link_of(f) is not None))
        delete = sorted(p for p in on_disk if p not in wanted)
        changed = [p for p in need if p in on_disk]
        return {"need": need, "delete": delete,
                "added": [p for p in need if p not in on_disk], "changed": changed,
                "unchanged": len(wanted) - len(need), "free_bytes": self.free(),
                "need_bytes": sum(wanted[p].size for p in need),
                "backup_bytes": sum(sizes.get(p, 0) for p in changed + delete),
                "current_version": current.version if current else None,
                "current_content_id": current.content_id if current else None,
                "agent_version": __version__, "root": str(self.root),
                "recovery_pending": pending[1]["label"] if pending else None}

    def _check_space(self, plan: dict) -> None:
        """Room for the new files uncompressed (staged) and the backups, before staging."""
        need = plan["need_bytes"] + plan["backup_bytes"] + DISK_HEADROOM
        free = self.free()
        if free < need:
            raise RemoteOpsError(f"not enough disk on the server: {free / 1e9:.2f} GB free, the "
                                 f"apply needs {need / 1e9:.2f} GB (new files uncompressed and "
                                 "backups); free space or lower deploy.keep_backups. Nothing was "
                                 "changed.")

    # -- apply ---------------------------------------------------------------------------
    def apply(self, manifest: Manifest, delta: Path | None, holder: str, keep: int = 10,
              delta_sha256: str | None = None, expect_base: str | None = None,
              expect_agent: str | None = None, early=None, checked: bool = False) -> dict:
        """Apply ``manifest``; every answer carries ``free_bytes`` (after the change).
        ``checked``: ``check_manifest`` passed for it in this process (the plan).

        ``early``: files staged while the upload arrived (``server/early_stage``), used when
        this plan needs exactly those; else the upload is staged now, as always.
        ``expect_base``: the content id the laptop believes is deployed here (it planned
        locally from it). When this root is not exactly that (another content id, files
        changed by hand, an interrupted change pending, an upload lacking a needed file)
        nothing is applied and the answer says ``base_differs`` with the reason: the
        laptop then plans against the server as usual.
        """
        if not checked:
            check_manifest(manifest)
        with self.lock(holder) as lock:
            refuse_if_live(self.root, "deploying")  # a live run reads these files
            if expect_base is not None:
                reason = self._base_check(expect_base, expect_agent)
                if reason:
                    return self._base_differs(reason)
            recovered = self.recover()
            plan = self.plan(manifest, checked=True)
            if expect_base is not None:
                reason = self._plan_check(manifest, plan)
                if reason:
                    return self._base_differs(reason)
            self._check_space(plan)
            result = self._stage_and_commit(manifest, plan, delta, delta_sha256, expect_base,
                                            early)
            if result.get("base_differs"):
                return result
            if result["noop"]:
                return {**result, "recovered": recovered, "broken_lock": lock.broken,
                        "free_bytes": self.free()}
            pruned = self.prune(keep)
            return {**result, "recovered": recovered, "pruned": pruned,
                    "broken_lock": lock.broken, "free_bytes": self.free()}

    def _stage_and_commit(self, manifest: Manifest, plan: dict, delta: Path | None,
                          delta_sha256: str | None, expect_base: str | None,
                          early=None) -> dict:
        """Stage and verify the new content, then commit it; the staging is always removed."""
        staging = self.state / "staging" / manifest.content_id
        shutil.rmtree(staging, ignore_errors=True)
        try:
            try:
                staged = (early.result(manifest, plan["need"], delta) if early is not None
                          else None)
                early_files = len(staged) if staged is not None else 0
                if staged is None:
                    staged = stage(manifest, delta, plan["need"], staging, delta_sha256)
            except MissingMembers as exc:
                if expect_base is None:
                    raise
                return self._base_differs(str(exc))
            changes = _changes(manifest, plan, staged)
            if not changes:
                return {"action": "apply", "noop": True, "version": manifest.version}
            needed = manifest.file_map()
            result = journal.commit(self, changes, kind="apply", version=manifest.version,
                                    after=manifest.to_dict(),
                                    label=f"v{manifest.version}",
                                    known={p: needed[p].sha256 for p in plan["need"]})
            if early_files:
                result["staged_while_arriving"] = early_files
            return result
        finally:
            shutil.rmtree(staging.parent, ignore_errors=True)

    def _base_check(self, expect_base: str, expect_agent: str | None) -> str | None:
        """Why this root is not the base the laptop planned from (None: it is)."""
        if expect_agent and expect_agent != __version__:
            return f"its agent is remoteops {__version__}, the bundle carries {expect_agent}"
        pending = self.pending_recovery()
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
                "agent_version": __version__, "free_bytes": self.free()}

    # -- recovery, rollback and backups: see their own modules ---------------------------
    def recover(self) -> dict | None:
        """Undo an interrupted change (all old again); drop half-written backups."""
        return journal.recover(self)

    def resolve_backup(self, name: str) -> Path:
        return rollback.resolve_backup(self, name)

    def rollback_plan(self, name: str) -> dict:
        return rollback.rollback_plan(self, name)

    def rollback(self, name: str, holder: str, keep: int = 10) -> dict:
        return rollback.rollback(self, name, holder, keep)

    def list_backups(self) -> list[dict]:
        """Backups oldest first by sequence number; the last undoes what is deployed now."""
        return list_backups(self.backups)

    def prune(self, keep: int) -> list[str]:
        return prune(self.backups, keep)
