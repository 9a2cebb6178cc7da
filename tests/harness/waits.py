"""Polling helpers for tests that wait on real processes."""

from __future__ import annotations

import time


def wait_for(cond, timeout: float, what: str, every: float = 0.1) -> None:
    """Poll ``cond()`` until it is true; fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
