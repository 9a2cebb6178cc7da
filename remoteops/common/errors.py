"""Errors a user can act on.

A ``RemoteOpsError`` is printed as its one-line message (what happened and
what to do) without a traceback; ``-v`` / ``REMOTEOPS_DEBUG=1`` shows it.
"""


class RemoteOpsError(Exception):
    """An error whose message tells the user what to do."""

    exit_code = 2


class ConfigError(RemoteOpsError):
    """A settings file or value is wrong."""


class ConnectError(RemoteOpsError):
    """The target could not be reached or refused us."""

    exit_code = 3


class HostKeyError(ConnectError):
    """The server's host key is unknown or has changed."""


class RemoteCommandError(RemoteOpsError):
    """A command on the target failed."""


def timed_out(seconds: float, where: str) -> RemoteCommandError:
    """A command that ran past ``ssh.command_timeout`` (the same words on every path)."""
    return RemoteCommandError(f"command timed out after {seconds:.0f}s on {where}; raise "
                              "ssh.command_timeout if it needs longer.")


def close_match(word: str, choices: list[str]) -> list[str]:
    """The choice nearest ``word`` (none or one), for "did you mean" (difflib, imported only
    on an error: it is 3 ms of every command's start)."""
    import difflib

    return difflib.get_close_matches(word, choices, n=1)
