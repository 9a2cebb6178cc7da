"""Read the ``ssh_config`` files for one host as OpenSSH 9's ``readconf.c`` does:
``Host`` and ``Match`` blocks, ``Include``, the first value of each option winning,
and the final pass ``Match final`` asks for.

What would make ``ssh`` connect somewhere we cannot follow is refused here with a
one-line error naming the keyword (see ``remoteops.laptop.ssh_config``).
"""

from __future__ import annotations

import glob
import os
import stat
from pathlib import Path

from remoteops.common.errors import ConfigError
from remoteops.laptop.ssh_config_syntax import (LocalUser, config_error, expand_hostname,
                                                expand_tilde, host_line_matches,
                                                match_pattern_list, normal_jump,
                                                parse_jump_hop, split_line)

_MAX_INCLUDE_DEPTH = 16
_UNSUPPORTED_MATCH = {"exec", "localnetwork", "tagged", "address", "localaddress",
                      "localport", "rdomain", "sessiontype", "command", "version"}


class Options(dict):
    """Settings of one resolution; the first value set wins, as in OpenSSH."""

    def first(self, key: str, value) -> None:
        self.setdefault(key, value)


class Reader:
    """One pass over the config files for one host, like ``read_config_file_depth``."""

    def __init__(self, host: str, local: LocalUser, opts: Options):
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
            parsed = split_line(line, where)
            if parsed is None:
                continue
            keyword, args, rest = parsed
            if keyword == "host":
                if not args:
                    raise config_error(where, "Host needs at least one pattern")
                active = not never and host_line_matches(self.host, args)
            elif keyword == "match":
                active = self._match(args, where, never) and not never
            elif keyword == "include":
                if not args:
                    raise config_error(where, "Include needs a file name")
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
            raise config_error(where, "Include nested too deeply (a loop?)")
        for arg in args:
            if arg.startswith("~") and not user_conf:
                raise config_error(where, "~ is not allowed in Include of the system config")
            if not arg.startswith(("/", "~")):
                arg = ("~/.ssh/" if user_conf else "/etc/ssh/") + arg
            pattern = expand_tilde(arg, self.local, where)
            for path in sorted(glob.glob(pattern)):
                self.read(path, user_conf, active, depth + 1, check_perm=True, never=not active)

    def _match(self, args: list[str], where: str, never: bool = False) -> bool:
        if not args:
            raise config_error(where,
                               "Match needs criteria (e.g. 'Match host NAME' or 'Match all')")
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
                    raise config_error(where, "'all' cannot be combined with other Match criteria")
                criterion = True
            elif attrib in ("canonical", "final"):
                # ssh re-reads the config once more when any "final" was seen (Fedora's
                # system config has "Match final all"); we never canonicalize the name itself
                self.want_final |= attrib == "final" and not negate
                criterion = self.final_pass
            elif attrib in ("host", "originalhost", "user", "localuser") or \
                    attrib in _UNSUPPORTED_MATCH:
                if i >= len(args):
                    raise config_error(where, f"Match {attrib} needs an argument")
                arg = args[i]
                i += 1
                if attrib in _UNSUPPORTED_MATCH:
                    unsupported = unsupported or attrib
                    continue
                criterion = self._criterion(attrib, arg)
            else:
                raise config_error(where, f"unsupported Match attribute {attrib!r}")
            if criterion == negate:
                result = False
        if result and unsupported and not never:
            raise config_error(where, f"Match {unsupported} is not supported by remoteops, and "
                                      f"ignoring it could connect somewhere else; use Match host / "
                                      f"user / originalhost, or a Host block.")
        return result

    def _criterion(self, attrib: str, arg: str) -> bool:
        if attrib == "host":
            name = self.opts.get("hostname")
            name = self.host if name is None else expand_hostname(name, self.original)
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
                raise config_error(where, f"invalid ProxyJump {value!r}: write [user@]host[:port], "
                                          f"comma-separated, or 'none'.")

    def _apply(self, keyword: str, args: list[str], where: str) -> None:
        opts = self.opts
        if keyword in ("hostname", "user", "port", "proxyjump", "proxycommand",
                       "identityfile", "identitiesonly", "canonicalizehostname",
                       "hostkeyalias", "proxyusefdpass") and not args:
            raise config_error(where, f"{keyword} needs a value")
        if keyword == "hostname":
            opts.first("hostname", args[0])
        elif keyword == "user":
            opts.first("user", args[0])
        elif keyword == "port":
            if not args[0].isdigit() or not 0 < int(args[0]) < 65536:
                raise config_error(where, f"bad Port {args[0]!r}: write a number from 1 to 65535")
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
            self._apply_jump(args[0], where)
        elif keyword == "proxyusefdpass":
            if args[0].lower() == "yes":  # the ProxyCommand would hand over a socket we cannot take
                raise config_error(where, "ProxyUseFdpass yes is not supported by remoteops; use "
                                          "ProxyJump, or a ProxyCommand that relays stdin/stdout.")
            opts.first("proxyusefdpass", "no")
        elif keyword == "canonicalizehostname":
            if args[0].lower() != "no":
                raise config_error(where, f"CanonicalizeHostname {args[0]} is not supported by "
                                          f"remoteops; set it to no, or write the full HostName.")
            opts.first("canonicalizehostname", "no")

    def _apply_jump(self, value: str, where: str) -> None:
        """ProxyJump counts only if neither ProxyCommand nor ProxyJump was set before; a
        jump (not ``none``) sets ProxyCommand to none, so a later ProxyCommand is ignored."""
        opts = self.opts
        self._check_jump(value, where)
        if "proxycommand" in opts or "proxyjump" in opts:
            return
        opts["proxyjump"] = normal_jump(value)
        if value.lower() != "none":
            if "%" in value:
                raise config_error(where, "% tokens in ProxyJump are not supported by "
                                          "remoteops (OpenSSH versions differ on them); "
                                          "write the hosts out.")
            opts["proxycommand"] = "none"


def read_options(host: str, local: LocalUser, files: list[tuple[str, bool]],
                 user: str | None, port: int | None, jump: str | None) -> Options:
    """The options ``ssh [-l user] [-p port] [-J jump] host`` ends up with from ``files``."""
    opts = Options()
    if user:
        opts["user"] = user  # command-line values come first, so they win
    if port:
        opts["port"] = port
    if jump is not None:
        opts["proxyjump"] = normal_jump(jump)
        opts["proxycommand"] = "none"
    reader = Reader(host, local, opts)
    for path, user_conf in files:
        reader.read(path, user_conf, True, check_perm=user_conf)
    if reader.want_final:
        # As ssh.c: the final pass matches Host lines against the resolved, lowercased
        # HostName, which is fixed from now on; first values still win.
        reader.host = opts["hostname"] = expand_hostname(opts.get("hostname"), host).lower()
        reader.final_pass = True
        for path, user_conf in files:
            reader.read(path, user_conf, True)
    return opts
