"""Resolve a host through ``~/.ssh/config`` exactly as OpenSSH's ``ssh`` does.

Why our own reader: paramiko's ``SSHConfig`` (5.1) skips ``Include`` silently,
cannot see a user given on the command line in ``Match user``, runs ``Match
exec`` commands, and keeps a ``ProxyJump`` after an earlier ``ProxyCommand``
(ssh keeps the first); Fabric then walks a ``ProxyJump a,b`` chain backwards.
Asking ``ssh -G`` at run time would make us equal by construction, but it runs
``Match exec`` commands, resolves ``~`` and relative Includes against the passwd
home instead of ``$HOME``, and needs an OpenSSH client on the laptop. So the
rules of OpenSSH 9's ``readconf.c`` are written down here and checked against
``ssh -G`` over a table of configs (tests/reliability/test_ssh_config.py): the
words of a config in ``ssh_config_syntax``, reading the files for one host in
``ssh_config_reader``, and here what ``ssh`` makes of the result, hop by hop.

What would make ``ssh`` connect somewhere we cannot follow (``Match exec``,
``Match localnetwork``, hostname canonicalization, ``%`` tokens in
``ProxyJump``, ``ProxyUseFdpass``) is refused with a one-line error naming the keyword.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field

from remoteops.common.errors import ConfigError
from remoteops.laptop.ssh_config_reader import read_options
from remoteops.laptop.ssh_config_syntax import (LocalUser, expand_hostname, expand_tilde,
                                                expand_tokens, match_pattern, parse_jump_hop,
                                                split_args)

SYSTEM_CONFIG = "/etc/ssh/ssh_config"
_MAX_HOPS = 16
# Tokens each keyword accepts (ssh_config(5), TOKENS).
_FILE_TOKENS = set("%CdhiklLnpru")
_PROXY_TOKENS = set("%hnpr")


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
    opts = read_options(host, local, config_files, user, port, jump)
    where = f"ssh config for {host!r}"
    hostname = expand_hostname(opts.get("hostname"), host).lower()
    port_n = int(opts.get("port") or 22)
    ruser = opts.get("user") or local.name
    values = _token_values(host, hostname, port_n, ruser, opts.get("hostkeyalias"), local)
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


def _token_values(host: str, hostname: str, port: int, ruser: str, alias: str | None,
                  local: LocalUser) -> dict[str, str]:
    """What each ``%`` token stands for (ssh_config(5), TOKENS)."""
    lhost = socket.gethostname()
    return {"h": hostname, "n": host, "p": str(port), "r": ruser, "u": local.name,
            "d": local.home, "i": str(local.uid), "k": alias or host,
            "l": lhost, "L": lhost.split(".")[0],
            "C": hashlib.sha1(f"{lhost}{hostname}{port}{ruser}".encode()).hexdigest()}


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
