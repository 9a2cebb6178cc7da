"""What remoteops treats as a secret: setting names (config) and file names (bundles).

Settings: a key whose name says it holds a secret (password, token, api key,
access key, private key, credential, ...) must be a ``{"$env" = "NAME"}``
reference, so the value never sits in a file that is shipped, printed or
committed. Login passwords (``password``, ``passwd``, ...) are refused even as
references: remoteops logs in with keys or ssh-agent only.

Files: private keys and credential files are left out of bundles unless the
project names them in ``bundle.include_secrets``. ``.env`` counts as a secret
(it conventionally holds API keys); its templates (``.env.example``,
``.env.sample``, ``.env.template``, ``.env.dist``) do not.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from remoteops.common.errors import ConfigError

# Names that can only mean a login password: refused outright.
LOGIN_PASSWORD_KEYS = frozenset({"password", "passwd", "pass", "pwd", "ssh_password",
                                 "sudo_password", "login_password"})

# Any word of the key (split on _ - . and camelCase) that marks a secret ...
_SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "secret", "secrets", "token",
                           "credential", "credentials", "apikey", "passcode"})
# ... or two adjacent words that do ("api key", "access key", "private key", ...).
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"),
                           ("secret", "key"), ("auth", "key"), ("signing", "key"),
                           ("client", "secret"), ("session", "key")})
# Run-together spellings (``hfToken`` splits, ``apikey`` or ``dbpassword`` do not).
_SECRET_SUBSTRINGS = ("password", "passwd", "passphrase", "secret", "credential", "apikey",
                      "accesskey", "privatekey", "authtoken", "accesstoken")

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^A-Za-z0-9]+", _CAMEL.sub("_", name).lower()) if w]


def is_login_password(name: str) -> bool:
    return name.lower() in LOGIN_PASSWORD_KEYS


# A key ending in one of these names where a secret is, or describes it: not the secret.
_NOT_THE_SECRET = frozenset({"file", "path", "dir", "env", "var", "name", "length", "len",
                             "count", "limit", "type", "kind", "url", "header", "budget", "size",
                             "ttl", "timeout", "seconds", "expiry", "prefix", "policy"})
# Tokenizer vocabulary: ``pad_token``, ``eos_token_id`` are not credentials.
_VOCAB_TOKEN = frozenset({"pad", "bos", "eos", "unk", "sep", "cls", "mask", "special", "stop",
                          "start", "end", "max", "min", "num", "per"})


def is_secret_key(name: str) -> bool:
    """True when a setting called ``name`` presumably holds a secret."""
    words = _words(name)
    if not words or words[-1] in _NOT_THE_SECRET:
        return False
    for i, w in enumerate(words):
        if w == "token" and ((i and words[i - 1] in _VOCAB_TOKEN)
                             or words[i + 1:i + 2] in (["id"], ["ids"])):
            words[i] = ""
    if any(w in _SECRET_WORDS for w in words):
        return True
    if any(pair in _SECRET_PAIRS for pair in zip(words, words[1:])):
        return True
    flat = "".join(words)
    return any(s in flat for s in _SECRET_SUBSTRINGS)


# gitignore-style, unanchored: a private key is a secret wherever it lies.
SECRET_FILE_PATTERNS = [
    ".ssh/", ".gnupg/",
    "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "id_ecdsa_sk", "id_ed25519_sk", "id_xmss",
    "*.pem", "*.key", "*.ppk", "*.p12", "*.pfx", "*.keystore", "*.jks",
    ".aws/credentials", ".netrc", "_netrc", ".envrc", ".git-credentials", ".pypirc",
    ".npmrc", "credentials.json", "service-account*.json", ".docker/config.json",
    ".kube/config", ".huggingface/token", ".cache/huggingface/token",
    ".env", ".env.*", "!.env.example", "!.env.sample", "!.env.template", "!.env.dist",
]

def _quick_filter() -> "re.Pattern[str]":
    """One regex that every secret path matches (the full gitignore check runs only on
    those): a secret file's own name, or a secret folder among its parents."""
    import fnmatch

    names, folders = [], []
    for pattern in SECRET_FILE_PATTERNS:
        if pattern.startswith("!"):
            continue
        if pattern.endswith("/"):
            folders.append(re.escape(pattern.rstrip("/")))
        else:
            names.append(fnmatch.translate(pattern.rsplit("/", 1)[-1]).replace(r"\Z", "$"))
    by_name = "|".join(f"(?:{n})" for n in names)
    by_folder = "|".join(folders)
    return re.compile(rf"(?:^|/)(?:{by_folder})/|(?:^|/)(?:{by_name.replace('(?s:', '(?:')})")


SECRET_CANDIDATE = _quick_filter()

# Files named id_* are keys when they hold one (id_mapping.json does not).
_KEY_HEADER = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


def looks_like_private_key(path: Path) -> bool:
    """An ``id_*`` file (not ``.pub``) whose first bytes are a PEM/OpenSSH private key header."""
    name = path.name
    if not name.startswith("id_") or name.endswith(".pub"):
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(100)
    except OSError:
        return False
    return bool(_KEY_HEADER.search(head))


# Secrets in settings are references to environment variables: {"$env" = "NAME"}.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_ref(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"$env"}


def env_name(leaf: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", leaf).strip("_").upper() or "MY_SECRET"


def refuse_secret(dotted: str, value: Any, secret: bool, where: str) -> None:
    """Refuse login passwords, and secret-looking keys that are not ``$env`` references.

    The messages never contain the value.
    """
    leaf = dotted.rsplit(".", 1)[-1]
    if is_login_password(leaf):
        raise ConfigError(f"{where}: '{dotted}' looks like a password; remoteops never stores "
                          "passwords: remove it and log in with an SSH key or ssh-agent.")
    if isinstance(value, Mapping) and "$env" in value:
        name = value.get("$env")
        if set(value) != {"$env"} or not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ConfigError(f"{where}: '{dotted}' is not a valid reference; write it as "
                              f"{leaf} = {{\"$env\" = \"{env_name(leaf)}\"}} (the name of an "
                              "environment variable, nothing else in the table).")
        return
    if not secret or (isinstance(value, Mapping) and value):
        return  # a table under a secret name: each of its values is checked in turn
    parts = dotted.split(".")
    first = next((i for i, part in enumerate(parts) if is_secret_key(part)), len(parts) - 1)
    name = env_name("_".join(parts[first:]))  # credentials.user -> CREDENTIALS_USER
    raise ConfigError(f"{where}: '{dotted}' holds a secret in plain text; remoteops never "
                      f"stores, prints or ships secrets: reference it instead, e.g. {leaf} = "
                      f"{{\"$env\" = \"{name}\"}}, and export {name} where remoteops runs.")


def resolve_secret(value: Any, env: Mapping[str, str] | None = None) -> str | None:
    """The secret a ``{"$env": NAME}`` reference points at (None when unset)."""
    if value in (None, ""):
        return None
    if is_ref(value):
        env = os.environ if env is None else env
        name = value["$env"]
        if name not in env:
            raise ConfigError(f"the environment variable {name} referenced in the config is not "
                              f"set; export it before running.")
        return env[name]
    raise ConfigError("secrets must be referenced as {\"$env\" = \"NAME\"}, not written out.")


def mask(key: str, value: Any) -> Any:
    if is_ref(value):
        return f"$env:{value['$env']}"
    return value


__all__ = ["is_ref", "refuse_secret", "resolve_secret", "mask", "SECRET_FILE_PATTERNS", "SECRET_CANDIDATE", "LOGIN_PASSWORD_KEYS", "is_secret_key", "is_login_password",
           "looks_like_private_key"]
