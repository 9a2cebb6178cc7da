"""Where the built-in plugins are: the repository's ``plugins/`` folder, or the copy the
toolkit wheel carries as ``remoteops/_builtin_plugins``.

Here rather than in ``remoteops.plugins``: the laptop packs that folder into the toolkit
wheel on every deploy, and importing the plugin loader for the path alone (pluggy,
``importlib.metadata``) took ~17 ms of the deploy's start.
"""

from __future__ import annotations

from pathlib import Path


def builtin_dir() -> Path:
    """The built-in plugins folder: the repo's ``plugins/`` or the copy inside the wheel."""
    package = Path(__file__).resolve().parents[1]  # the remoteops package (this is common/)
    shipped = package / "_builtin_plugins"
    if shipped.is_dir():
        return shipped
    return package.parent / "plugins"
