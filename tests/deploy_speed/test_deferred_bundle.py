"""A streamed redeploy answers before its bundle is written: the tar and manifest follow in a
forked child, and whatever reads the bundles folder next waits for them."""

from __future__ import annotations

import fcntl

from remoteops.common.manifest import verify_bundle
from tests.test_deploy import (as_json, deploy, expected_tree, make_project,  # noqa: F401
                               server_root, tree)


def test_the_bundle_follows_the_answer_and_the_next_deploy_waits_for_it(deploy, project,
                                                                        server_root):
    deploy("deploy-bundle", "--yes")
    (project / "code" / "train.py").write_text("print('v2')\n" * 2000)
    out = as_json(deploy("deploy-bundle", "--yes", "--json"))
    assert out["version"] == 2 and out["plan"]["changed"] == ["code/train.py"]
    assert tree(server_root) == expected_tree(project)
    # at once, while the child may still write v2: this build waits for it, finds v2 the
    # latest and the same content, so it is a no-op that makes no v3
    again = as_json(deploy("deploy-bundle", "--yes", "--json"))
    assert again["noop"] and again["version"] == 2
    bundles = project / "bundles"
    assert not list(bundles.glob("*-v3*"))
    manifest = verify_bundle(bundles / "proj-v2.tar.zst")  # every byte as the manifest says
    assert manifest.content_id == out["content_id"]
    # the deferred bundle is a bundle like any other: deployed by name
    res = as_json(deploy("deploy-bundle", "--yes", "--json", "--bundle",
                         str(bundles / "proj-v2.tar.zst")))
    assert res["noop"] and res["version"] == 2
    with open(bundles / ".writing.lock") as fh:  # nobody holds the writer lock any more
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_redeploy_over_a_fresh_login_writes_its_bundle_in_a_child_after_closing(
        deploy, project, server_root, tmp_path):
    """Through paramiko (its transport is a thread, so no fork while it is open) the tar
    used to be written by the command itself before it ended (~0.15 s on the bench); now
    the connection is closed first and a detached child (it calls setsid) writes it."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    import time

    from tests.test_deploy import ENV

    strace = shutil.which("strace")
    assert strace, "strace is missing (tests/harness/install.py installs it)"
    cold = {"REMOTEOPS_SSH__PERSIST": "0", "REMOTEOPS_SSH__CLIENT": "paramiko"}
    deploy("deploy-bundle", "--yes", env=cold)
    (project / "code" / "train.py").write_text("print('v2')\n")
    log = tmp_path / "strace.log"
    res = subprocess.run(
        [strace, "-f", "-qq", "-o", str(log), "-e", "trace=setsid,rename,renameat,renameat2",
         sys.executable, "-m", "remoteops", "deploy-bundle", "--host", "box", "--project-root",
         str(server_root), "--yes", "--json"], cwd=project, capture_output=True, text=True,
        env=dict(os.environ, COLUMNS="200", **ENV, **cold), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert as_json(res)["version"] == 2 and tree(server_root) == expected_tree(project)
    deadline = time.monotonic() + 30
    while not (project / "bundles" / "proj-v2.manifest.json").exists():
        assert time.monotonic() < deadline, "the bundle was never written"
        time.sleep(0.1)
    verify_bundle(project / "bundles" / "proj-v2.tar.zst")
    lines = log.read_text().splitlines()
    detached = {line.split()[0] for line in lines if re.search(r"\bsetsid\(\) += \d", line)}
    wrote = [line.split()[0] for line in lines
             if re.search(r'rename\w*\(.*"[^"]*proj-v2\.tar\.zst"', line)]
    assert wrote and set(wrote) <= detached, "\n".join(lines[-20:])
