"""The ``remoteops`` console script: every task, in any folder, no tasks.py needed."""

from invoke import Program

from remoteops import __version__
from remoteops.laptop.tasks import make_namespace

program = Program(namespace=make_namespace(), version=__version__, name="remoteops",
                  binary="remoteops")
