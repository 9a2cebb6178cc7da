"""Plugins: the project's folder, installed packages, blocking, tracing, misspelled hooks."""

import json
import shutil
import sys

from tests.conftest import REPO

PLUGINS = REPO / "tests" / "plugins"
LOCAL = {"REMOTEOPS_GPU_GATE": "off", "REMOTEOPS_PRECHECK__MIN_DISK_GB": "0.01",
         "REMOTEOPS_PRECHECK__MIN_RAM_GB": "0.1", "REMOTEOPS_PRECHECK__REQUIRED_PACKAGES": "click",
         "REMOTEOPS_PRECHECK__OPTIONAL_PACKAGES": ""}


def listed(cli, env=None):
    res = cli("plugins", "--json", env=env)
    assert res.returncode == 0, res.stderr
    return {p["name"]: p for p in json.loads(res.stdout)}


def checks(cli, env=None):
    res = cli("precheck", "--host", "local", "--json", env=dict(LOCAL, **(env or {})))
    return res, {c["name"]: c for c in json.loads(res.stdout)["checks"]}


def test_builtins_are_listed_with_their_hooks(cli):
    found = listed(cli)
    assert found["gpu_gate"]["source"] == "builtin"
    assert found["gpu_gate"]["hooks"] == ["register_checks"]
    assert found["precheck_basics"]["location"].endswith("precheck_basics.py")


def test_project_plugins_folder_is_picked_up(cli, project):
    (project / "plugins").mkdir()
    shutil.copy(PLUGINS / "hf_cache.py", project / "plugins")
    found = listed(cli)
    assert found["hf_cache"]["source"] == "project"
    assert found["hf_cache"]["hooks"] == ["register_checks"]
    res, rows = checks(cli)
    assert res.returncode == 0
    assert rows["hf cache"]["status"] == "ok" and "GB free" in rows["hf cache"]["value"]
    # plugin settings come from [plugins.<name>]
    (project / "remoteops.toml").write_text("[plugins.hf_cache]\nmin_free_gb = 1e12\n")
    res, rows = checks(cli)
    assert rows["hf cache"]["status"] == "warn" and "HF_HOME" in rows["hf cache"]["hint"]


def test_installed_plugin_package_is_listed_and_runs(cli, tmp_path):
    src = tmp_path / "example"
    shutil.copytree(PLUGINS / "remoteops-example-check", src)
    try:
        res = cli("install-plugin", str(src), timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "installed plugin example_check" in res.stdout
        found = listed(cli)
        assert found["example_check"]["source"] == "entrypoint"
        assert found["example_check"]["version"] == "1.2.0"
        res, rows = checks(cli)
        assert rows["uptime"]["status"] == "ok" and rows["uptime"]["value"].startswith("up ")
    finally:
        res = cli("uninstall-plugin", "remoteops-example-check")
    assert res.returncode == 0, res.stderr
    assert "example_check" not in listed(cli)


def test_install_plugin_that_does_not_exist_is_one_line(cli):
    res = cli("install-plugin", "remoteops-no-such-plugin-xyz==9.9.9", timeout=300)
    assert res.returncode == 2
    assert res.stderr.startswith("error: pip could not install remoteops-no-such-plugin-xyz")


def test_block_plugins_env(cli, project):
    env = {"REMOTEOPS_BLOCK_PLUGINS": "gpu_gate,precheck_basics"}
    found = listed(cli, env)
    assert "gpu_gate" not in found
    assert "precheck_basics" in found  # core checks cannot be blocked
    res, rows = checks(cli, env)
    assert "gpu gate" not in rows and "python" in rows


def test_trace_hooks_env(cli):
    res = cli("precheck", "--host", "local", env=dict(LOCAL, REMOTEOPS_TRACE_HOOKS="1"))
    assert "hook register_checks -> plugin gpu_gate" in res.stderr


def test_misspelled_hook_is_caught(cli, project):
    (project / "plugins").mkdir()
    (project / "plugins" / "typo.py").write_text(
        "from remoteops import hookimpl\n\n@hookimpl\ndef register_chekcs(register):\n    pass\n")
    res = cli("plugins")
    assert res.returncode == 2
    assert "register_chekcs" in res.stderr and "hookspecs" in res.stderr


def test_plugin_that_fails_to_import_names_the_file(cli, project):
    (project / "plugins").mkdir()
    (project / "plugins" / "broken.py").write_text("import no_such_module_xyz\n")
    res = cli("plugins")
    assert res.returncode == 2 and "broken.py" in res.stderr and "No module named" in res.stderr


def test_in_process_manager_skips_entrypoints_under_tests():
    from remoteops.plugins import get_plugin_manager

    assert getattr(sys, "_called_from_test", False)
    pm = get_plugin_manager(REPO)
    assert all(i.source != "entrypoint" for i in pm.infos())
