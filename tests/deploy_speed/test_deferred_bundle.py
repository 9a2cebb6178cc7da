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
