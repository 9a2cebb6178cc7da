"""Pure Python used by both sides (laptop and server).

Imports neither remoteops.laptop/server code nor torch: only the standard library
(and, in time, other modules of ``remoteops.common``). ``tests/test_common.py``
checks this in a fresh interpreter.

- ``files``: the read chunk size, sha256 of files, fsync of folders, atomic writes;
- ``clock``: UTC stamps for names and ISO-8601 times for records;
- ``sizes``: byte counts for people.
"""
