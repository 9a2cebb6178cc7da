"""Secrets stay out of bundles and config output; default excludes are anchored to the root.

Every test runs the real ``remoteops`` command and reads what a user would see
(the plan text, ``config --json``) and what would travel (the manifest and the
decompressed tar bytes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

ENV = {"REMOTEOPS_REMOTE_PYTHON": sys.executable}

# path -> a marker that must never appear in a bundle's bytes
SECRET_FILES = {
    ".ssh/config": "Host x", ".aws/credentials": "[default]", ".netrc": "machine m",
    ".envrc": "export A=1", "certs/server.pem": "-----BEGIN CERTIFICATE-----",
    "certs/tls.key": "key", ".git-credentials": "https://u:p@h", ".pypirc": "[pypi]",
    "credentials.json": "{}", ".env": "HF_TOKEN=x", "deploy/.env.production": "DB=x",
}


def make_secret_project(project: Path) -> dict[str, str]:
    """A project with every kind of secret file, each holding a unique marker."""
    markers = {}
    for rel, body in SECRET_FILES.items():
        markers[rel] = f"SECRET-MARKER-{len(markers)}-{body}"
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(markers[rel] + "\n")
    keys = project / "keys"
    keys.mkdir()
    for name in ("id_rsa", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", name[3:], "-N", "", "-f", str(keys / name)],
                       check=True)
        markers[f"keys/{name}"] = (keys / name).read_text().splitlines()[1]
    # an id_* file under another name is caught by its content
    (keys / "id_deploy").write_text((keys / "id_ed25519").read_text())
    markers["keys/id_deploy"] = markers["keys/id_ed25519"]
    (project / "train.py").write_text("print('train')\n")
    (project / ".env.example").write_text("HF_TOKEN=\n")  # a template, not a secret
    (project / "id_mapping.json").write_text("{}\n")      # id_* but not a key
    return markers


def bundle_contents(project: Path) -> tuple[set[str], bytes]:
    """The manifest's file list and the decompressed bytes of the newest bundle."""
    manifest = max((project / "bundles").glob("*.manifest.json"), key=lambda p: p.stat().st_mtime)
    files = {f["path"] for f in json.loads(manifest.read_text())["files"]}
    tar = manifest.with_name(manifest.name.replace(".manifest.json", ".tar.zst"))
    raw = zstandard.ZstdDecompressor().stream_reader(tar.open("rb"), read_across_frames=True)
    return files, raw.read()


def dry_run(cli, tmp_path: Path):
    res = cli("deploy-bundle", "--host", "local", "--project-root", str(tmp_path / "server"),
              "--dry-run", env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_secret_files_are_left_out_and_the_plan_names_them(cli, project, tmp_path):
    markers = make_secret_project(project)
    res = dry_run(cli, tmp_path)
    files, data = bundle_contents(project)
    for rel, marker in markers.items():
        assert rel not in files, rel
        assert marker.encode() not in data, rel
    assert {"train.py", ".env.example", "id_mapping.json", "keys/id_rsa.pub"} <= files
    line = next(l for l in res.stdout.splitlines() if "secret file(s)" in l)
    assert f"left out {len(markers)} secret file(s)" in line
    for rel in sorted(markers)[:10]:  # the plan names ten, then counts the rest
        assert rel in line, rel
    assert "bundle.include_secrets" in line
    assert not (tmp_path / "server" / "keys").exists()


def test_include_secrets_ships_exactly_the_named_file(cli, project, tmp_path):
    markers = make_secret_project(project)
    (project / "remoteops.toml").write_text('[bundle]\ninclude_secrets = ["keys/id_ed25519"]\n')
    res = dry_run(cli, tmp_path)
    files, data = bundle_contents(project)
    shipped = {rel for rel in markers if rel in files}
    assert shipped == {"keys/id_ed25519"}
    assert markers["keys/id_rsa"].encode() not in data
    assert "shipping 1 secret file(s) named in bundle.include_secrets: keys/id_ed25519" \
        in res.stdout
    built = json.loads(cli("build-bundle", "--json").stdout)
    assert built["excluded"]["secrets_included"] == ["keys/id_ed25519"]
    assert "keys/id_deploy" in built["excluded"]["secrets"]


def test_default_excludes_are_anchored_to_the_project_root(cli, project, tmp_path):
    for rel in ("code/env/__init__.py", "data/checkpoints/x.json", "code/outputs/fmt.py",
                "env/lib/site.py", "outputs/adapter/w.bin", "checkpoints/c.bin", "venv/bin/py",
                "code/__pycache__/m.cpython-311.pyc", "node_modules/x/i.js"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(rel)
    res = dry_run(cli, tmp_path)
    files, _ = bundle_contents(project)
    assert {"code/env/__init__.py", "data/checkpoints/x.json", "code/outputs/fmt.py"} <= files
    assert not any(f.startswith(("env/", "outputs/", "checkpoints/", "venv/", "node_modules/"))
                   or "__pycache__" in f for f in files)
    line = next(l for l in res.stdout.splitlines() if "left out by rule" in l)
    for part in ("/env/ (1: env/)", "/outputs/ (1: outputs/)", "/checkpoints/ (1: checkpoints/)",
                 "/venv/ (1: venv/)", "__pycache__/ (1: code/__pycache__/)",
                 "node_modules/ (1: node_modules/)"):
        assert part in line, part


def test_bundle_out_dir_under_another_name_is_not_bundled(cli, project):
    (project / "remoteops.toml").write_text('[bundle]\nout_dir = "dist/b"\n')
    (project / "a.py").write_text("A = 1\n")
    for _ in range(2):
        (project / "a.py").write_text((project / "a.py").read_text() + "#\n")
        res = cli("build-bundle", "--json")
        assert res.returncode == 0, res.stderr
    manifest = max((project / "dist" / "b").glob("*.manifest.json"))
    files = {f["path"] for f in json.loads(manifest.read_text())["files"]}
    assert files == {"a.py", "remoteops.toml"}


SECRET_KEYS = ["db_password", "aws_secret_access_key", "hf_token", "api_key", "apiKey", "secret",
               "wandb_token", "access_key", "private_key", "credential", "client_secret",
               "passphrase"]


def test_secret_looking_keys_must_be_env_references(cli, project):
    for key in SECRET_KEYS:
        value = f"plain-{key}-value"
        text = f'project_name = "p"\n\n[plugins.hub]\nendpoint = "e"\n{key} = "{value}"\n'
        (project / "remoteops.toml").write_text(text)
        for args in (("config", "--json"), ("build-bundle",)):
            res = cli(*args)
            assert res.returncode == 2, (key, res.stdout, res.stderr)
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
            assert "remoteops.toml:5" in lines[0] and f"plugins.hub.{key}" in lines[0]
            assert '{"$env" = "' in lines[0]  # what to write instead
            assert value not in res.stdout + res.stderr
        assert sorted(p.name for p in project.iterdir()) == ["remoteops.toml"]


def test_a_reference_is_accepted_and_never_resolved_in_output(cli, project):
    (project / "remoteops.toml").write_text(
        '[plugins.hub]\nhf_token = {"$env" = "HF_TOKEN"}\n'
        '[plugins.db.credentials]\nuser = {"$env" = "DB_USER"}\n')
    res = cli("config", "--json", env={"HF_TOKEN": "hf_realvalue", "DB_USER": "dbuser-real"})
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["plugins.hub.hf_token"]["value"] == "$env:HF_TOKEN"
    assert data["plugins.db.credentials.user"]["value"] == "$env:DB_USER"
    assert "hf_realvalue" not in res.stdout and "dbuser-real" not in res.stdout


@pytest.mark.parametrize("text, needle", [
    ('[plugins.db.credentials]\nuser = "s3cr3t"\n', "CREDENTIALS_USER"),
    ('[plugins.hub]\nhf_token = {"$env" = "HF TOKEN"}\n', "not a valid reference"),
    ('[hosts.gpu]\nhost = "h"\npassword = {"$env" = "PW"}\n', "ssh-agent"),
])
def test_secret_tables_bad_references_and_login_passwords(cli, project, text, needle):
    (project / "remoteops.toml").write_text(text)
    res = cli("config", "--json")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], res.stderr
    assert "s3cr3t" not in res.stderr


def test_which_key_names_count_as_secrets():
    from remoteops.common.secret_rules import is_secret_key

    secret = ["db_password", "aws_secret_access_key", "hf_token", "HF_TOKEN", "api_key", "apiKey",
              "apikey", "secret", "wandb_token", "access_key", "AWS_ACCESS_KEY_ID",
              "private_key", "credential", "credentials", "client_secret", "passphrase",
              "dbpassword", "access_token", "githubToken"]
    not_secret = ["max_new_tokens", "tokenizer", "pad_token", "eos_token_id", "token_file",
                  "password_file", "max_token", "num_tokens", "token_budget", "keystone",
                  "monkey", "include_secrets_path", "host", "port", "lora_targets"]
    assert [k for k in secret if not is_secret_key(k)] == []
    assert [k for k in not_secret if is_secret_key(k)] == []
