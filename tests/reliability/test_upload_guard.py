"""An upload whose bytes did not all arrive is never renamed into place (mock: a lossy
SFTP file cannot be made on purpose; the target is a real local one that drops the
last chunk silently, as paramiko's pipelined file can when the link is cut)."""

from __future__ import annotations

import os
import sys

import pytest

from remoteops.common.errors import ConnectError
from remoteops.common.files import CHUNK
from remoteops.common.target import LocalTarget
from remoteops.laptop.transfer import put_resumable


def test_mock_lossy_sftp_a_short_upload_is_refused_and_the_retry_resumes(tmp_path,
                                                                         monkeypatch):
    local = tmp_path / "batch.tar.gz"
    local.write_bytes(os.urandom(3 * CHUNK + 123))
    target = LocalTarget("local", str(tmp_path / "server"), sys.executable, 30)
    remote = str(tmp_path / "server" / "incoming" / "batch.tar.gz")
    real_open = target._open_append

    class Lossy:
        def __init__(self, fh):
            self.fh, self.writes = fh, 0

        def write(self, data):
            self.writes += 1
            if self.writes < 3:  # the rest vanishes with the link, and nothing is raised
                self.fh.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(target, "_open_append", lambda path: Lossy(real_open(path)))
    with pytest.raises(ConnectError, match=f"broke during the upload .*{2 * CHUNK} of "
                                           f"{3 * CHUNK + 123} bytes arrived.*resumes where"):
        put_resumable(target, local, remote)
    assert not os.path.exists(remote) and os.path.getsize(remote + ".part") == 2 * CHUNK
    monkeypatch.setattr(target, "_open_append", real_open)
    assert put_resumable(target, local, remote) == CHUNK + 123  # only the rest is sent
    assert open(remote, "rb").read() == local.read_bytes()
