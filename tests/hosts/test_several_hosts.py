"""precheck, deploy-bundle, backups and rollback on three real sshd at once: one broken
host (a wrong key; a full disk) fails the command once, by name, after the others finish."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tests.hosts.conftest import ENV, keyed, write_project


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.relative_to(root).as_posix().startswith(".remoteops/")}


def code(project: Path, text: str) -> dict[str, str]:
    (project / "code").mkdir(exist_ok=True)
    (project / "code" / "train.py").write_text(text)
    return {"code/train.py": hashlib.sha256(text.encode()).hexdigest(),
            "remoteops.toml": hashlib.sha256((project / "remoteops.toml").read_bytes())
            .hexdigest()}


def test_a_host_with_a_wrong_key_fails_once_by_name_and_the_others_finish(
        cli, project, servers, roots, wrong_key):
    write_project(project, servers, roots, '\n[groups.all]\nhosts = ["h1", "h2", "h3"]\n',
                  keys={"h2": wrong_key})
    res = cli("precheck", "--host", "@all", env=ENV)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "== h1: ok" in res.stdout and "== h3: ok" in res.stdout
    assert "== h2: FAILED" in res.stdout
    assert res.stdout.count("precheck passed") == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "error: precheck failed on 1 of 3 hosts: h2 (the others finished; see each host's "
        "result above).")
    assert "Traceback" not in res.stderr

    res = cli("precheck", "--host", "h3,h2,h1", "--json", env=ENV)
    assert res.returncode == 1
    data = keyed(res.stdout)
    assert list(data) == ["h3", "h2", "h1"]  # in the order named
    assert data["h1"]["ok"] and data["h3"]["ok"] and data["h1"]["result"]["ok"]
    assert not data["h2"]["ok"] and "h2" not in res.stderr.split("hosts:")[0]
    assert "authentication" in data["h2"]["error"].lower() or "key" in data["h2"]["error"]


def test_deploy_to_a_group_with_a_full_disk_then_roll_back_by_version(
        cli, project, servers, roots):
    write_project(project, servers, roots, '\n[groups.gpus]\nhosts = ["h1", "h2", "h3"]\n')
    v1 = code(project, "print('v1')\n")
    roots["h2"].mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(roots["h2"])],
                   check=True)
    try:
        (project / "data").mkdir()
        (project / "data" / "big.bin").write_bytes(os.urandom(4_000_000))
        res = cli("deploy-bundle", "--host", "@gpus", "--yes", env=ENV, timeout=300)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "error: deploy-bundle failed on 1 of 3 hosts: h2" in res.stderr
        assert "not enough disk" in res.stdout  # under h2's name
        big = hashlib.sha256((project / "data" / "big.bin").read_bytes()).hexdigest()
        for h in ("h1", "h3"):
            assert tree(roots[h]) == {**v1, "data/big.bin": big}, h
        assert tree(roots["h2"]) == {}
    finally:
        subprocess.run(["umount", str(roots["h2"])], check=False)

    (project / "data" / "big.bin").unlink()
    v2 = code(project, "print('v2')\n")
    res = cli("deploy-bundle", "--host", "h1,h3", "--yes", "--json", env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    data = keyed(res.stdout)
    assert [data[h]["result"]["applied"]["version"] for h in ("h1", "h3")] == [2, 2]
    assert tree(roots["h1"]) == tree(roots["h3"]) == v2

    listed = keyed(cli("backups", "--host", "h1,h3", "--json", env=ENV).stdout)
    assert [[b["version"] for b in listed[h]["result"]] for h in ("h1", "h3")] == [[1, 2]] * 2

    res = cli("rollback", "--host", "h1,h3", "--backup", "v1", "--yes", env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("rolled back to v1") == 2
    assert tree(roots["h1"]) == tree(roots["h3"]) == {**v1, "data/big.bin": big}

    # back to v2 by naming each host's own backup (the rollback's)
    listed = keyed(cli("backups", "--host", "h1,h3", "--json", env=ENV).stdout)
    names = {h: listed[h]["result"][-1]["name"] for h in ("h1", "h3")}
    res = cli("rollback", "--backup", f"h1={names['h1']},h3={names['h3']}", "--yes", env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    assert tree(roots["h1"]) == tree(roots["h3"]) == v2
    # a version no backup restores: named per host, in one line
    res = cli("rollback", "--host", "h1,h3", "--backup", "v7", "--yes", env=ENV)
    assert res.returncode == 1
    assert "no backup on" in res.stdout and "restores v7" in res.stdout
    assert "rollback failed on 2 of 2 hosts: h1, h3" in res.stderr
