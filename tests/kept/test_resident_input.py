"""A request's input through the resident agent: moved by the kernel (``splice``) where it
can be, read and written where it cannot; either way the child reads exactly what the
laptop sent, in frames of any size, and the frames that follow stay in step."""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest

import remoteops

from remoteops.common.kept_wire import END, INPUT, frame, json_frame, REQUEST
from tests.full_stream.test_full_stream import (_answers, _build, _deployed_exactly, _fill,
                                                _leftovers, deployed, stream_input)  # noqa: F401
from tests.kept.test_resident import Resident, copy  # noqa: F401

NO_SPLICE = "import os\ntry:\n    del os.splice\nexcept AttributeError:\n    pass\n"


def _frames(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` as input frames of uneven sizes: a byte, odd sizes, up to a full MiB."""
    out, at = [], 0
    while at < len(data):
        size = rng.choice([1, 7, 4093, 65536, 300_001, 1 << 20])
        out.append(frame(INPUT, data[at:at + size]))
        at += size
    return out


@pytest.mark.parametrize("splice", [True, False], ids=["spliced", "read and written"])
def test_a_full_deploy_through_the_resident_arrives_whole(
        copy, deployed, project, cli, splice):  # noqa: F811 - fixtures imported above
    if not splice:  # this Python without os.splice: the resident reads and writes instead
        (copy / "sitecustomize.py").write_text(NO_SPLICE)
    elif not hasattr(os, "splice"):
        pytest.skip("no os.splice here")
    _fill(project, 7)
    manifest, tar = _build(cli, project)
    stdin = stream_input(manifest, tar.read_bytes())
    assert len(stdin) > 1 << 20  # more than a full frame
    resident = Resident(copy)
    try:
        req = resident.proc.stdin
        req.write(json_frame(REQUEST, {"argv": ["deploy-stream", "--root", str(deployed),
                                                "--json"]}))
        kind, _ = resident.next()
        assert kind == b"S"
        for piece in _frames(stdin, random.Random(3)):
            req.write(piece)
        req.write(frame(END))
        out, err, code = b"", b"", None
        while code is None:
            kind, payload = resident.next()
            if kind == b"X":
                code = int(payload)
            out += payload if kind == b"O" else b""
            err += payload if kind == b"R" else b""
        assert code == 0, err.decode()
        plan, applied = _answers(SimpleNamespace(stdout=out))
        assert plan["need"] and applied["noop"] is False
        assert _deployed_exactly(deployed, manifest)
        assert _leftovers(deployed) == []
        # the frames after it are read in step: the next request runs and answers
        answer = resident.request(["version", "--json"])
        assert answer["code"] == 0 and remoteops.__version__ in answer["out"], answer
    finally:
        assert resident.close() == 0
