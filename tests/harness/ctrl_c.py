"""``python -m remoteops ARGS`` started so that a Ctrl-C (SIGINT) sent to it arrives.

A child inherits its parent's ignored and blocked signals. In three full-suite runs
``serve`` never saw the Ctrl-C a test sent it (it passed alone; a pytest process that
ignores SIGINT reproduces it exactly, though probes around every test found no test that
changes the worker's SIGINT); ``remoteops`` must not depend on what the test process
inherited. The command is started through a few lines that give SIGINT its default
action, unblock it, and exec the real command (Python then installs its
KeyboardInterrupt handler as for any program started from a terminal).
"""

from __future__ import annotations

import sys

_WITH_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
                "os.execv(sys.executable, [sys.executable, '-m', 'remoteops', *sys.argv[1:]])")


def remoteops_argv(*args: str) -> list[str]:
    """The argv of ``python -m remoteops ARGS`` that a Ctrl-C always reaches."""
    return [sys.executable, "-c", _WITH_SIGINT, *args]


__all__ = ["remoteops_argv"]
