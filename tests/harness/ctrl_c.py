"""``python -m remoteops ARGS`` started so that a Ctrl-C (SIGINT) sent to it arrives.

A child inherits its parent's ignored and blocked signals. In the full suite an earlier
test can leave a pytest worker with SIGINT ignored (it happened: ``serve`` then never saw
the Ctrl-C a test sent it and the test timed out, while it passed alone); ``remoteops``
must not depend on that. The command is started through a few lines that give SIGINT its
default action, unblock it, and exec the real command (Python then installs its
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
