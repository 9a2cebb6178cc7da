"""remoteops: drive fine-tuning on rented GPU servers over SSH.

Plugin authors need only::

    from remoteops import hookimpl, Check

See ``remoteops.hookspecs`` for every hook and ``README.md`` for a worked
example plugin.
"""

__version__ = "0.1.0"

from remoteops.hookspecs import hookimpl  # noqa: E402
from remoteops.checks import Check, CheckResult  # noqa: E402

__all__ = ["__version__", "hookimpl", "Check", "CheckResult"]
