"""remoteops: drive fine-tuning on rented GPU servers over SSH.

Plugin authors need only::

    from remoteops import hookimpl, Check

See ``remoteops.hookspecs`` for every hook and ``README.md`` for a worked
example plugin.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``hookimpl``, ``Check`` and ``CheckResult`` on first use: the agent, which imports
    this package for every command, never pays for pluggy unless it loads plugins."""
    if name == "hookimpl":
        from remoteops.hookspecs import hookimpl

        return hookimpl
    if name in ("Check", "CheckResult"):
        from remoteops import checks

        return getattr(checks, name)
    raise AttributeError(f"module 'remoteops' has no attribute {name!r}")


__all__ = ["__version__", "hookimpl", "Check", "CheckResult"]
