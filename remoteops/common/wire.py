"""The wire between the laptop and the agent, the one module both sides import.

The laptop runs ``<python> -m remoteops.agent <command> --json`` (or a short script
through ``run_python``) over SSH or a local shell; the answer is JSON printed between
``BEGIN`` and ``END``, so whatever a login shell prints around it (a banner, a conda
notice) is ignored. A payload (settings and all) travels on stdin after ``PAYLOAD_MARK``,
never on the command line, where every user of the server sees it in ``ps``.
"""

from __future__ import annotations

import json
from typing import Any

from remoteops.common.errors import RemoteCommandError

BEGIN = "@@REMOTEOPS-BEGIN-7f3a@@"
END = "@@REMOTEOPS-END-7f3a@@"

PAYLOAD_MARK = "@@REMOTEOPS-PAYLOAD-7f3a@@"
# Reads the payload (settings and all) from stdin, never from the command line, where every
# user of the server sees it in ``ps``; prints the answer only between markers.
_BOOTSTRAP = (
    "import base64,json,sys,zlib;"
    "r=sys.stdin.buffer.read();i=r.rfind(b'{mark}');"
    "i<0 and sys.exit('remoteops: the payload did not arrive on stdin; something in the "
    "login shell (~/.bashrc) reads stdin: guard it with [[ $- == *i* ]]');"
    "d=json.loads(zlib.decompress(base64.b64decode(r[i+{skip}:])).decode());"
    "g={{'payload':d['payload'],'__name__':'__remoteops__'}};"
    "exec(compile(d['source'],'<remoteops>','exec'),g);"
    "sys.stdout.write('\\n{begin}\\n'+json.dumps(g.get('result'))+'\\n{end}\\n')"
)



def marked(data: Any) -> str:
    """What the agent prints for ``--json``: ``data`` between the markers."""
    return f"\n{BEGIN}\n{json.dumps(data, default=str)}\n{END}\n"


def parse_marked(stdout: str) -> Any:
    """The JSON between the markers, ignoring whatever a login shell printed around it."""
    start = stdout.rfind(BEGIN)
    end = stdout.rfind(END)
    if start < 0 or end < start:
        raise RemoteCommandError("the target's Python printed no answer; check that "
                                 "remote_python runs a Python 3 and that the login shell's "
                                 "startup files do not exit or replace the command.")
    return json.loads(stdout[start + len(BEGIN):end].strip())


__all__ = ["BEGIN", "END", "PAYLOAD_MARK", "parse_marked"]
