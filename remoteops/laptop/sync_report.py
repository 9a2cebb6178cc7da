"""What ``sync-data`` prints: a round's result and ``--status``."""

from __future__ import annotations

from remoteops.common.sizes import human_size


def describe_round(done, watch: bool = False) -> str:
    """One line after a round (or after ``--watch`` stopped)."""
    head = "stopped; " if watch else ""
    sent = (f"sent {done.sent} sample(s) ({human_size(done.sent_bytes)} uploaded) in "
            f"{done.batches} batch(es)" if done.sent else "nothing new to send")
    tail = f"; the server has {done.server}"
    if done.pending:
        tail += f"; {done.pending} still being written here (sent once complete)"
    if done.bad:
        tail += f"; not samples, skipped: {', '.join(done.bad[:5])}"
    return head + sent + tail


def _last_error(s: dict) -> str:
    if not s["last_error"]:
        return "none"
    since = s["last_sync_at"] and s["last_sync_at"] >= s["last_error_at"]
    return f"{s['last_error']} ({s['last_error_at']}" + ("; synced fine since)" if since else ")")


def describe_status(s: dict) -> str:
    """``sync-data --status`` as a few aligned lines."""
    rows = [
        ("source", f"{s['source']} ({s['format']})"),
        ("local", f"{s['local']} complete sample(s)" + (f", {s['being_written']} still being written"
                                              if s["being_written"] else "")),
        ("server", f"{s['server']} verified sample(s) in {s['host']}:{s['dest']}"
                   + (f", last at {s['server_last_at']}" if s["server_last_at"] else "")),
        ("lag", f"{s['lag']} sample(s) not on the server yet"
                + (f" (oldest waiting {s['oldest_waiting_seconds']:.0f}s)"
                   if s["oldest_waiting_seconds"] is not None else "")),
        ("complete", f"yes, {s['complete']['samples']} sample(s) at {s['complete']['at']}"
                     if s["complete"] else "no (sync-data --done marks it)"),
        ("last sync", s["last_sync_at"] or "never from this laptop"),
        ("last error", _last_error(s)),
    ]
    if s["changed_after_sent"]:
        names = ", ".join(s["changed_after_sent"][:5])
        rows.append(("changed", f"{len(s['changed_after_sent'])} sample(s) changed here after "
                     f"they were sent ({names}); the server keeps what it verified and never "
                     "takes an id twice: save a new version under a new name"))
    if s["not_samples"]:
        rows.append(("skipped", ", ".join(s["not_samples"][:5]) + " (not valid samples)"))
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


__all__ = ["describe_round", "describe_status"]
