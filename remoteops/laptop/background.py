"""A function run in a thread, its result or its error taken later (``Background``).

What a command overlaps with its own work: the SSH connection opening while the bundle is
hashed, the plugin set found meanwhile, a request started early.
"""

from __future__ import annotations

import threading
from typing import Callable


class Background:
    """A function run in a thread; ``result()`` waits and re-raises its exception."""

    def __init__(self, fn: Callable, *args):
        self._value = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to result()
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    def done(self) -> bool:
        return not self._thread.is_alive()

    def settle(self) -> None:
        """Wait, dropping any error (the caller is already failing with its own)."""
        self._thread.join()


__all__ = ["Background"]
