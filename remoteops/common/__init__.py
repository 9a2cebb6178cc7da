"""Pure Python used by both sides (laptop and server).

Imports no side (``remoteops.laptop``, ``remoteops.server``), no trainer or quant, no plugin
machinery, and nothing of torch, SSH (fabric, paramiko), or the CLIs (invoke, click, rich):
the standard library, ``zstandard`` and ``tomli``, and other modules of
``remoteops.common``. ``tests/test_architecture.py`` (import-linter) and
``tests/test_common.py`` (a fresh interpreter) check this.

- ``files``: the read chunk size, sha256 of files, fsync of folders, atomic writes;
- ``clock``: UTC stamps for names and ISO-8601 times for records;
- ``sizes``: byte counts for people;
- ``errors``: the exceptions a user can act on;
- ``paths``: the one check of every path, tar member and link target;
- ``secret_rules``: what counts as a secret (config keys, files left out of bundles);
- ``config``, ``config_schema``, ``defaults``: layered settings, their rules and defaults;
- ``wire``: the markers and payload framing between the laptop and the agent;
- ``target``: the ``Target`` interface and ``LocalTarget`` (this machine);
- ``bundle_tar``, ``manifest``: the bundle format, verify, and the plan between manifests;
- ``runs``: stage planning, run state, liveness and the pipeline lock;
- ``locks``: the file lock that names its holder;
- ``model_ref``: what ``train.base_model`` names (folder, Hugging Face or ModelScope id), where
  that model is on this machine, and whether its folder is complete (standalone: the
  base-model precheck probe carries its source to the server).
"""
