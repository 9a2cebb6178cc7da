"""Resolve a host through ``~/.ssh/config`` exactly as OpenSSH's ``ssh`` does.

Why our own reader: paramiko's ``SSHConfig`` (5.1) skips ``Include`` silently,
cannot see a user given on the command line in ``Match user``, runs ``Match
exec`` commands, and keeps a ``ProxyJump`` after an earlier ``ProxyCommand``
(ssh keeps the first); Fabric then walks a ``ProxyJump a,b`` chain backwards.
Asking ``ssh -G`` at run time would make us equal by construction, but it runs
``Match exec`` commands, resolves ``~`` and relative Includes against the passwd
home instead of ``$HOME``, and needs an OpenSSH client on the laptop. So the
rules of OpenSSH 9's ``readconf.c`` are written down here and checked against
``ssh -G`` over a table of configs (tests/reliability/test_ssh_config.py).

What would make ``ssh`` connect somewhere we cannot follow (``Match exec``,
``Match localnetwork``, hostname canonicalization, ``%`` tokens in
``ProxyJump``, ``ProxyUseFdpass``) is refused with a one-line error naming the keyword.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import re
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from remoteops.common.errors import ConfigError

SYSTEM_CONFIG = "/etc/ssh/ssh_config"
_MAX_INCLUDE_DEPTH = 16
_MAX_HOPS = 16
_UNSUPPORTED_MATCH = {"exec", "localnetwork", "tagged", "address", "localaddress",
                      "localport", "rdomain", "sessiontype", "command", "version"}
# Tokens each keyword accepts (ssh_config(5), TOKENS).
_FILE_TOKENS = set("%CdhiklLnpru")
_PROXY_TOKENS = set("%hnpr")


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


@dataclass
class HostConfig:
    """One endpoint, fully resolved: where to connect, as whom, with which keys, via what."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: list[str] = field(default_factory=list)   # expanded, in order
    identity_raw: list[str] = field(default_factory=list)     # as written (``ssh -G`` shows these)
    identities_only: bool = False
    proxy_jump: str | None = None        # ProxyJump as ``ssh -G`` shows it, or "none"
    proxy_command: str | None = None     # expanded; None when unset or "none"
    via: "HostConfig | None" = None      # the hop we connect through (first hop innermost)

    def chain(self) -> list["HostConfig"]:
        """Every hop in connection order (first one connected first), then this host."""
        return (self.via.chain() if self.via else []) + [self]


class _Options(dict):
    """Settings of one resolution; the first value set wins, as in OpenSSH."""

    def first(self, key: str, value) -> None:
        self.setdefault(key, value)


def _error(where: str, message: str) -> ConfigError:
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
            raise _error(where, "unterminated quote")
        args.append("".join(arg))
    return args


def _split_line(line: str, where: str) -> tuple[str, list[str], str] | None:
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


def _host_line_matches(host: str, patterns: list[str]) -> bool:
    positive = False
    for pat in patterns:
        negated = pat.startswith("!")
        if match_pattern(host, pat[1:] if negated else pat):
            if negated:
                return False
            positive = True
    return positive


def expand_tilde(path: str, local: LocalUser, where: str) -> str:
    if not path.startswith("~"):
        return path
    name, _, rest = path[1:].partition("/")
    if name:
        try:
            home = pwd.getpwnam(name).pw_dir
        except KeyError:
            raise _error(where, f"no such user {name!r} in {path!r}") from None
    else:
        home = local.home
    return home.rstrip("/") + ("/" + rest if rest else "")


def expand_tokens(text: str, values: dict[str, str], allowed: set[str], keyword: str,
                  where: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "%":
            key = text[i + 1:i + 2]
            if not key or key not in allowed:
                raise _error(where, f"{keyword} does not accept the token %{key}; write "
                                    f"%% for a literal %.")
            out.append("%" if key == "%" else values[key])
            i += 2
        elif c == "$" and text[i + 1:i + 2] == "{":
            end = text.find("}", i)
            name = text[i + 2:end] if end > 0 else ""
            if not name or name not in os.environ:
                raise _error(where, f"{keyword} names the environment variable ${{{name}}}, "
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


def _normal_jump(value: str) -> str:
    """As OpenSSH keeps it: the hops before the last as written, the last as user@host:port."""
    if value.lower() == "none" or "%" in value:
        return value
    rest, _, last = value.rpartition(",")
    user, host, port = parse_jump_hop(last)  # type: ignore[misc]
    host = f"[{host}]" if ":" in host else host
    last = (f"{user}@" if user else "") + host + (f":{port}" if port else "")
    return f"{rest},{last}" if rest else last


class _Reader:
    """One pass over the config files for one host, like ``read_config_file_depth``."""

    def __init__(self, host: str, local: LocalUser, opts: _Options):
        self.host = host              # what Host lines see: the name given, then the HostName
        self.original = host          # the name given (%h in HostName, Match originalhost)
        self.local = local
        self.opts = opts
        self.final_pass = False       # Match canonical/final are true only in the final pass
        self.want_final = False

    def read(self, path: str, user_conf: bool, active: bool, depth: int = 0,
             check_perm: bool = False, never: bool = False) -> bool:
        """Apply ``path``; ``never``: an Include in a block that does not apply, where
        OpenSSH still evaluates each Match (for errors and ``final``) but applies nothing."""
        try:
            if check_perm:
                self._check_perm(path)
            text = Path(path).read_text(errors="surrogateescape")
        except FileNotFoundError:
            return active
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        for number, line in enumerate(text.splitlines(), 1):
            where = f"{path} line {number}"
            parsed = _split_line(line, where)
            if parsed is None:
                continue
            keyword, args, rest = parsed
            if keyword == "host":
                if not args:
                    raise _error(where, "Host needs at least one pattern")
                active = not never and _host_line_matches(self.host, args)
            elif keyword == "match":
                active = self._match(args, where, never) and not never
            elif keyword == "include":
                if not args:
                    raise _error(where, "Include needs a file name")
                self._include(args, user_conf, active and not never, depth, where)
            elif active and keyword == "proxycommand" and args:
                self.opts.first("proxycommand", rest)  # a ProxyJump before set it to "none"
            elif active:
                self._apply(keyword, args, where)
            elif keyword == "proxyjump" and args:
                self._check_jump(args[0], where)  # OpenSSH refuses bad syntax anywhere
        return active

    @staticmethod
    def _check_perm(path: str) -> None:
        """As ssh: a config others can write could send us anywhere."""
        st = os.stat(path)
        if st.st_uid not in (0, os.getuid()) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"Bad owner or permissions on {path}: ssh refuses it too; "
                              f"run 'chmod go-w {path}'.")

    def _include(self, args: list[str], user_conf: bool, active: bool, depth: int,
                 where: str) -> None:
        if depth >= _MAX_INCLUDE_DEPTH:
            raise _error(where, "Include nested too deeply (a loop?)")
        for arg in args:
            if arg.startswith("~") and not user_conf:
                raise _error(where, "~ is not allowed in Include of the system config")
            if not arg.startswith(("/", "~")):
                arg = ("~/.ssh/" if user_conf else "/etc/ssh/") + arg
            pattern = expand_tilde(arg, self.local, where)
            for path in sorted(glob.glob(pattern)):
                self.read(path, user_conf, active, depth + 1, check_perm=True, never=not active)

    def _match(self, args: list[str], where: str, never: bool = False) -> bool:
        if not args:
            raise _error(where, "Match needs criteria (e.g. 'Match host NAME' or 'Match all')")
        result, unsupported = True, None
        i = 0
        while i < len(args):
            attrib = args[i].lower()
            i += 1
            negate = attrib.startswith("!")
            attrib = attrib[1:] if negate else attrib
            if attrib == "all":
                others = {a.lower().lstrip("!") for a in args} - {"all"}
                if not others <= {"canonical", "final"}:
                    raise _error(where, "'all' cannot be combined with other Match criteria")
                criterion = True
            elif attrib in ("canonical", "final"):
                # ssh re-reads the config once more when any "final" was seen (Fedora's
                # system config has "Match final all"); we never canonicalize the name itself
                self.want_final |= attrib == "final" and not negate
                criterion = self.final_pass
            elif attrib in ("host", "originalhost", "user", "localuser") or \
                    attrib in _UNSUPPORTED_MATCH:
                if i >= len(args):
                    raise _error(where, f"Match {attrib} needs an argument")
                arg = args[i]
                i += 1
                if attrib in _UNSUPPORTED_MATCH:
                    unsupported = unsupported or attrib
                    continue
                criterion = self._criterion(attrib, arg)
            else:
                raise _error(where, f"unsupported Match attribute {attrib!r}")
            if criterion == negate:
                result = False
        if result and unsupported and not never:
            raise _error(where, f"Match {unsupported} is not supported by remoteops, and "
                                f"ignoring it could connect somewhere else; use Match host / "
                                f"user / originalhost, or a Host block.")
        return result

    def _criterion(self, attrib: str, arg: str) -> bool:
        if attrib == "host":
            name = self.opts.get("hostname")
            name = self.host if name is None else _hostname(name, self.original)
            return match_pattern_list(name.lower(), arg, True) == 1
        if attrib == "originalhost":
            return match_pattern_list(self.original.lower(), arg, True) == 1
        if attrib == "user":
            return match_pattern_list(self.opts.get("user") or self.local.name, arg, False) == 1
        return match_pattern_list(self.local.name, arg, False) == 1  # localuser

    def _check_jump(self, value: str, where: str) -> None:
        if value.lower() == "none":
            return
        for hop in value.split(","):
            if parse_jump_hop(hop) is None:
                raise _error(where, f"invalid ProxyJump {value!r}: write [user@]host[:port], "
                                    f"comma-separated, or 'none'.")

    def _apply(self, keyword: str, args: list[str], where: str) -> None:
        opts = self.opts
        if keyword in ("hostname", "user", "port", "proxyjump", "proxycommand",
                       "identityfile", "identitiesonly", "canonicalizehostname",
                       "hostkeyalias", "proxyusefdpass") and not args:
            raise _error(where, f"{keyword} needs a value")
        if keyword == "hostname":
            opts.first("hostname", args[0])
        elif keyword == "user":
            opts.first("user", args[0])
        elif keyword == "port":
            if not args[0].isdigit() or not 0 < int(args[0]) < 65536:
                raise _error(where, f"bad Port {args[0]!r}: write a number from 1 to 65535")
            opts.first("port", int(args[0]))
        elif keyword == "identityfile":
            files = opts.setdefault("identityfile", [])
            if args[0] not in files:
                files.append(args[0])
        elif keyword == "identitiesonly":
            opts.first("identitiesonly", args[0].lower() == "yes")
        elif keyword == "hostkeyalias":
            opts.first("hostkeyalias", args[0])
        elif keyword == "proxyjump":
            self._check_jump(args[0], where)
            if "proxycommand" in opts or "proxyjump" in opts:
                return
            opts["proxyjump"] = _normal_jump(args[0])
            if args[0].lower() != "none":
                if "%" in args[0]:
                    raise _error(where, "% tokens in ProxyJump are not supported by remoteops "
                                        "(OpenSSH versions differ on them); write the hosts out.")
                opts["proxycommand"] = "none"
        elif keyword == "proxyusefdpass":
            if args[0].lower() == "yes":  # the ProxyCommand would hand over a socket we cannot take
                raise _error(where, "ProxyUseFdpass yes is not supported by remoteops; use "
                                    "ProxyJump, or a ProxyCommand that relays stdin/stdout.")
            opts.first("proxyusefdpass", "no")
        elif keyword == "canonicalizehostname":
            if args[0].lower() != "no":
                raise _error(where, f"CanonicalizeHostname {args[0]} is not supported by "
                                    f"remoteops; set it to no, or write the full HostName.")
            opts.first("canonicalizehostname", "no")


def _read_options(host: str, local: LocalUser, files: list[tuple[str, bool]],
                  user: str | None, port: int | None, jump: str | None) -> _Options:
    opts = _Options()
    if user:
        opts["user"] = user  # command-line values come first, so they win
    if port:
        opts["port"] = port
    if jump is not None:
        opts["proxyjump"] = _normal_jump(jump)
        opts["proxycommand"] = "none"
    reader = _Reader(host, local, opts)
    for path, user_conf in files:
        reader.read(path, user_conf, True, check_perm=user_conf)
    if reader.want_final:
        # As ssh.c: the final pass matches Host lines against the resolved, lowercased
        # HostName, which is fixed from now on; first values still win.
        reader.host = opts["hostname"] = _hostname(opts.get("hostname"), host).lower()
        reader.final_pass = True
        for path, user_conf in files:
            reader.read(path, user_conf, True)
    return opts


def _hostname(value: str | None, host: str) -> str:
    if value is None:
        return host
    return expand_tokens(value, {"h": host}, set("%h"), "HostName", "ssh config")


def resolve(host: str, *, config_files: list[tuple[str, bool]] | None = None,
            user: str | None = None, port: int | None = None, jump: str | None = None,
            local: LocalUser | None = None, _depth: int = 0) -> HostConfig:
    """Resolve ``host`` as ``ssh [-l user] [-p port] [-J jump] host`` would.

    ``config_files`` are ``(path, is_user_config)`` pairs read in order; the
    default is ``~/.ssh/config`` then the system file, as a plain ``ssh``.
    """
    local = local or LocalUser.current()
    if config_files is None:
        config_files = [(os.path.join(local.home, ".ssh", "config"), True),
                        (SYSTEM_CONFIG, False)]
    if _depth > _MAX_HOPS:
        raise ConfigError(f"ProxyJump for {host!r} goes through more than {_MAX_HOPS} hops; "
                          "is there a loop in ~/.ssh/config?")
    opts = _read_options(host, local, config_files, user, port, jump)
    where = f"ssh config for {host!r}"
    hostname = _hostname(opts.get("hostname"), host).lower()
    port_n = int(opts.get("port") or 22)
    ruser = opts.get("user") or local.name
    lhost = socket.gethostname()
    values = {"h": hostname, "n": host, "p": str(port_n), "r": ruser, "u": local.name,
              "d": local.home, "i": str(local.uid), "k": opts.get("hostkeyalias") or host,
              "l": lhost, "L": lhost.split(".")[0],
              "C": hashlib.sha1(f"{lhost}{hostname}{port_n}{ruser}".encode()).hexdigest()}
    raw = list(opts.get("identityfile", []))
    expanded = [expand_tokens(expand_tilde(f, local, where), values, _FILE_TOKENS,
                              "IdentityFile", where) for f in raw]
    proxy_command = opts.get("proxycommand")
    if proxy_command and proxy_command.lower() != "none":
        proxy_command = expand_tokens(proxy_command, values, _PROXY_TOKENS, "ProxyCommand",
                                      where)
    else:
        proxy_command = None
    result = HostConfig(host, hostname, port_n, ruser, expanded, raw,
                        bool(opts.get("identitiesonly")), opts.get("proxyjump"), proxy_command)
    jump_value = opts.get("proxyjump")
    if jump_value and jump_value.lower() != "none":
        result.via = _resolve_jump(jump_value, config_files, local, _depth)
    return result


def _resolve_jump(value: str, config_files: list[tuple[str, bool]], local: LocalUser,
                  depth: int) -> HostConfig:
    """``ProxyJump a,b``: OpenSSH runs ``ssh -J a b`` as the proxy, so ``b`` is reached
    through ``a`` (b's own ProxyJump is overridden) and ``a`` through its own config."""
    hops = value.split(",")
    last_user, last_host, last_port = parse_jump_hop(hops[-1])  # type: ignore[misc]
    rest = ",".join(hops[:-1]) or None
    return resolve(last_host, config_files=config_files, user=last_user, port=last_port,
                   jump=rest, local=local, _depth=depth + 1)


__all__ = ["HostConfig", "LocalUser", "resolve", "split_args", "match_pattern",
           "parse_jump_hop", "SYSTEM_CONFIG"]
