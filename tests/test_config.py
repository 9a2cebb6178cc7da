"""Layered settings: precedence, sources, seed env names, bad files, refused passwords."""

import json

import pytest

from remoteops.common.config import load_settings
from remoteops.common.errors import ConfigError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_flag_beats_env_beats_project_beats_user_file(project, home):
    write(home / ".config" / "remoteops" / "config.toml", 'gpu_gate = "off"\nremote_python = "/u/py"\n')
    write(project / "remoteops.toml", 'gpu_gate = "warn"\n[precheck]\nmin_disk_gb = 5\n')
    s = load_settings(project, env={"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")})
    assert s["gpu_gate"] == "warn" and s.source("gpu_gate") == "project remoteops.toml"
    assert s["remote_python"] == "/u/py" and s.source("remote_python").startswith("user file")
    assert s["precheck.min_disk_gb"] == 5.0
    env = {"XDG_CONFIG_HOME": str(home / ".config"), "REMOTEOPS_GPU_GATE": "off",
           "REMOTEOPS_PRECHECK__MIN_DISK_GB": "7.5"}
    s = load_settings(project, env=env)
    assert s["gpu_gate"] == "off" and s.source("gpu_gate") == "env REMOTEOPS_GPU_GATE"
    assert s["precheck.min_disk_gb"] == 7.5
    s = load_settings(project, env=env, flags={"gpu_gate": "strict"})
    assert s["gpu_gate"] == "strict" and s.source("gpu_gate") == "flag"


def test_seed_env_names(project):
    env = {"TRAIN_SYNC_PROJECT_ROOT": "/root/seed", "TRAIN_SYNC_NON_INTERACTIVE": "1",
           "TRAIN_SYNC_ASSUME_YES": "yes", "TRAIN_SYNC_SKIP_SAMPLE": "0"}
    s = load_settings(project, env=env)
    assert s["project_root"] == "/root/seed"
    assert s.source("project_root") == "env TRAIN_SYNC_PROJECT_ROOT"
    assert s["non_interactive"] is True and s["assume_yes"] is True and s["skip_sample"] is False
    s = load_settings(project, env=env, flags={"project_root": "/root/flag"})
    assert s["project_root"] == "/root/flag"


def test_pyproject_tool_table_is_read(project):
    write(project / "pyproject.toml", '[project]\nname="x"\n[tool.remoteops]\ngpu_gate = "off"\n')
    s = load_settings(project, env={})
    assert s["gpu_gate"] == "off"
    assert "pyproject.toml" in s.source("gpu_gate")


def test_malformed_toml_names_file_and_line(project):
    write(project / "remoteops.toml", 'gpu_gate = "warn"\n\n[precheck\nmin_disk_gb = 5\n')
    with pytest.raises(ConfigError) as err:
        load_settings(project, env={})
    msg = str(err.value)
    assert "remoteops.toml" in msg and "line 3" in msg


@pytest.mark.parametrize("text", ['password = "hunter2"\n',
                                  '[hosts.gpu]\nhost = "gpu.example.com"\npassword = "x"\n',
                                  '[hosts.gpu]\npasswd = {"$env" = "PW"}\n'])
def test_password_anywhere_is_refused(project, text):
    write(project / "remoteops.toml", text)
    with pytest.raises(ConfigError) as err:
        load_settings(project, env={})
    assert "password" in str(err.value) and "ssh-agent" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_secret_must_be_a_reference(project):
    write(project / "remoteops.toml", '[hosts.gpu]\nhost = "h"\npassphrase = "s3cret"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(project, env={})
    assert "$env" in str(err.value) and "s3cret" not in str(err.value)
    write(project / "remoteops.toml", '[hosts.gpu]\nhost = "h"\npassphrase = {"$env" = "KP"}\n')
    s = load_settings(project, env={})
    shown = dict((k, v) for k, v, _ in s.items())
    assert shown["hosts.gpu.passphrase"] == "$env:KP"


def test_unknown_setting_suggests_the_right_one(project):
    write(project / "remoteops.toml", 'gpu_gaet = "warn"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(project, env={})
    assert "gpu_gaet" in str(err.value) and "gpu_gate" in str(err.value)


def test_bad_values_are_explained(project):
    with pytest.raises(ConfigError) as err:
        load_settings(project, env={"REMOTEOPS_GPU_GATE": "maybe"})
    assert "strict, warn, off" in str(err.value) and "REMOTEOPS_GPU_GATE" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_settings(project, env={"REMOTEOPS_PRECHECK__MIN_DISK_GB": "lots"})
    assert "precheck.min_disk_gb" in str(err.value)


def test_config_task_shows_values_and_sources(cli, project):
    write(project / "remoteops.toml", 'gpu_gate = "warn"\n')
    res = cli("config", "--json", env={"TRAIN_SYNC_PROJECT_ROOT": "/root/p"})
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["gpu_gate"] == {"value": "warn", "source": "project remoteops.toml"}
    assert data["project_root"] == {"value": "/root/p", "source": "env TRAIN_SYNC_PROJECT_ROOT"}
    assert data["ssh.connect_timeout"]["source"] == "default"
    table = cli("config").stdout
    assert "gpu_gate" in table and "project remoteops.toml" in table


def test_malformed_config_is_one_line_error_from_cli(cli, project):
    write(project / "remoteops.toml", "gpu_gate = \n")
    res = cli("precheck", "--host", "local")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "remoteops.toml: line 1" in lines[0]


def test_a_table_given_a_single_value_is_explained(project):
    write(project / "remoteops.toml", "ssh = 3\n")
    with pytest.raises(ConfigError) as err:
        load_settings(project, env={})
    assert "'ssh' is a table" in str(err.value)


def test_a_runs_settings_are_fixed_at_its_start_and_hold_no_secret(project, tmp_path):
    """pipeline-start saves the settings; the runner, trainer and plugins of the run read
    them back (common.runs.run_settings), whatever the files say later."""
    from remoteops.common.runs import SETTINGS_FILE, run_settings, save_run_settings

    write(project / "remoteops.toml", '[hosts.gpu]\nhostname = "gpu.example.com"\n'
          'passphrase = {"$env" = "KEY_PASSPHRASE"}\n[train]\nlr = 0.001\n')
    s = load_settings(project, env={"KEY_PASSPHRASE": "secret_value"}, flags={"gpu_gate": "off"})
    run = tmp_path / "run_1"
    save_run_settings(run, s)
    write(project / "remoteops.toml", "[train]\nlr = 0.5\n")  # edited later
    again = run_settings(run, project)
    assert again.values == s.values and again.sources == s.sources
    assert again["train.lr"] == 0.001 and again.source("gpu_gate") == "flag"
    assert again["hosts.gpu.passphrase"] == {"$env": "KEY_PASSPHRASE"}
    assert "secret_value" not in (run / SETTINGS_FILE).read_text()
    (run / SETTINGS_FILE).write_text("{")
    with pytest.raises(Exception, match="is damaged .*start a new run"):
        run_settings(run, project)
    assert run_settings(tmp_path / "older_run", project)["train.lr"] == 0.5
