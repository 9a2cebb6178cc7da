"""Developer tasks for remoteops itself, on top of every user-facing task."""

import shlex
import sys

from invoke import task

from remoteops.tasks import make_namespace

ns = make_namespace()


@task(help={"k": "only tests matching this expression (pytest -k)",
            "x": "stop at the first failure"})
def test(c, k=None, x=False):
    """Run the whole test suite (installs openssh-server first when sshd is missing)."""
    from tests.harness.install import ensure_sshd

    ensure_sshd()
    args = [sys.executable, "-m", "pytest", "-q"]
    args += ["-k", k] if k else []
    args += ["-x"] if x else []
    c.run(shlex.join(args), pty=False, env={"PYTHONUNBUFFERED": "1"})


ns.add_task(test)
