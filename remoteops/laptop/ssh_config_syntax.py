"""The words of ``ssh_config``: splitting a line, OpenSSH's patterns, ``~`` and ``%``
expansion, and ``ProxyJump`` hops; who runs ``ssh`` (``LocalUser``).

Each follows the function of the same purpose in OpenSSH 9 (``misc.c``,
``match.c``, ``readconf.c``); ``remoteops.laptop.ssh_config`` resolves a host with them.
"""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass

from remoteops.common.errors import ConfigError


@dataclass(frozen=True)
class LocalUser:
    """Who runs ``ssh``: OpenSSH takes these from the passwd entry; we take ``$HOME``
    for the home, as paramiko does, so a test's throwaway HOME is honoured."""

    name: str
    uid: int
    home: str

    @classmethod
    def current(cls) -> "LocalUser":
        uid = os.getuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = os.environ.get("USER", str(uid))
        return cls(name, uid, os.path.expanduser("~"))


def config_error(where: str, message: str) -> ConfigError:
    """The error for a config line (``where``: file and line) ssh would refuse or we cannot
    follow."""
    return ConfigError(f"{where}: {message}")


def split_args(text: str, where: str) -> list[str]:
    """OpenSSH's ``argv_split``: quotes, backslash escapes, ``#`` starts a comment."""
    args: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n or text[i] == "#":
            break
        arg, quote = [], ""
        while i < n:
            c = text[i]
            if c == "\\" and i + 1 < n and (text[i + 1] in "'\"\\" or
                                            (not quote and text[i + 1] == " ")):
                arg.append(text[i + 1])
                i += 2
                continue
            if not quote and c in " \t":
                break
            if not quote and c in "'\"":
                quote = c
            elif quote and c == quote:
                quote = ""
            else:
                arg.append(c)
            i += 1
        if quote:
            raise config_error(where, "unterminated quote")
        args.append("".join(arg))
    return args


def split_line(line: str, where: str) -> tuple[str, list[str], str] | None:
    """Keyword, its arguments, and the raw rest of the line (ProxyCommand keeps that)."""
    line = line.strip(" \t\r\n\f")
    m = re.match(r"([^\s=]+)\s*(?:=\s*)?(.*)$", line)
    if not line or line.startswith("#") or not m:
        return None
    return m.group(1).lower(), split_args(m.group(2), where), m.group(2)


def match_pattern(text: str, pattern: str) -> bool:
    """OpenSSH's glob: only ``*`` and ``?``, the whole string, case-sensitive."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, re.S) is not None


def match_pattern_list(text: str, patterns: str, lower: bool) -> int:
    """1 when a pattern of the comma list matches, -1 when a ``!pattern`` does, else 0."""
    found = 0
    for pat in patterns.split(","):
        negated = pat.startswith("!")
        pat = pat[1:] if negated else pat
        if lower:
            pat = pat.lower()
        if match_pattern(text, pat):
            if negated:
                return -1
            found = 1
    return found


def host_line_matches(host: str, patterns: list[str]) -> bool:
    """A ``Host`` line applies: some pattern matches and no ``!pattern`` does."""
    positive = False
    for pat in patterns:
        negated = pat.startswith("!")
        if match_pattern(host, pat[1:] if negated else pat):
            if negated:
                return False
            positive = True
    return positive


def expand_tilde(path: str, local: LocalUser, where: str) -> str:
    """``~`` (``local``'s home) or ``~user`` at the start of ``path``."""
    if not path.startswith("~"):
        return path
    name, _, rest = path[1:].partition("/")
    if name:
        try:
            home = pwd.getpwnam(name).pw_dir
        except KeyError:
            raise config_error(where, f"no such user {name!r} in {path!r}") from None
    else:
        home = local.home
    return home.rstrip("/") + ("/" + rest if rest else "")


def expand_tokens(text: str, values: dict[str, str], allowed: set[str], keyword: str,
                  where: str) -> str:
    """``%`` tokens (only those ``allowed`` for ``keyword``) and ``${VAR}`` in ``text``."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "%":
            key = text[i + 1:i + 2]
            if not key or key not in allowed:
                raise config_error(where, f"{keyword} does not accept the token %{key}; write "
                                          f"%% for a literal %.")
            out.append("%" if key == "%" else values[key])
            i += 2
        elif c == "$" and text[i + 1:i + 2] == "{":
            end = text.find("}", i)
            name = text[i + 2:end] if end > 0 else ""
            if not name or name not in os.environ:
                raise config_error(where, f"{keyword} names the environment variable ${{{name}}}, "
                                          f"which is not set.")
            out.append(os.environ[name])
            i = end + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


# OpenSSH 9 refuses a bracketed IPv6 address in an ssh:// hop but accepts it plain.
_URI = re.compile(r"^ssh://(?:(?P<user>[^@/]+)@)?(?P<host>[^:@/\[\]]+)(?::(?P<port>\d*))?/?$")
_USER_HOST_PORT = re.compile(r"^(?:(?P<user>.+)@)?(?P<host>\[[^\]]+\]|[^:@\[\]]+)"
                             r"(?::(?P<port>\d*))?$")


def parse_jump_hop(spec: str) -> tuple[str | None, str, int | None] | None:
    """``[user@]host[:port]`` or ``ssh://[user@]host[:port]``; None when malformed."""
    m = (_URI if spec.startswith("ssh://") else _USER_HOST_PORT).match(spec)
    if not m or not m.group("host").strip("[]"):
        return None
    port = int(m.group("port")) if m.group("port") else None  # "host:" means no port
    if port is not None and not 0 < port < 65536:
        return None
    return m.group("user"), m.group("host").strip("[]"), port


def normal_jump(value: str) -> str:
    """As OpenSSH keeps it: the hops before the last as written, the last as user@host:port."""
    if value.lower() == "none" or "%" in value:
        return value
    rest, _, last = value.rpartition(",")
    user, host, port = parse_jump_hop(last)  # type: ignore[misc]
    host = f"[{host}]" if ":" in host else host
    last = (f"{user}@" if user else "") + host + (f":{port}" if port else "")
    return f"{rest},{last}" if rest else last


def expand_hostname(value: str | None, host: str) -> str:
    """A HostName value with its ``%h`` expanded (``host`` when there is none)."""
    if value is None:
        return host
    return expand_tokens(value, {"h": host}, set("%h"), "HostName", "ssh config")


__all__ = ["LocalUser", "config_error", "split_args", "split_line", "match_pattern",
           "match_pattern_list", "host_line_matches", "expand_tilde", "expand_tokens",
           "parse_jump_hop", "normal_jump", "expand_hostname"]
