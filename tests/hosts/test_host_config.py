"""[groups.NAME] and [hosts.NAME.overrides] are checked when the settings load: one line
that says where and what to write; --host @group and a,b,c expand in order, each once."""

from __future__ import annotations

import pytest

from remoteops.common.config import load_settings
from remoteops.common.errors import ConfigError
from remoteops.laptop.host_group import expand, folder_name, settings_for


def load(project, text: str):
    (project / "remoteops.toml").write_text(text)
    return load_settings(project, env={})


@pytest.mark.parametrize("text,expected", [
    ('[hosts.a]\nhost = "x"\n[hosts.a.overrides]\ntrain.lrr = 1e-4\n',
     "remoteops.toml:4: unknown setting 'train.lrr' in 'hosts.a.overrides'. Did you mean "
     "'train.lr'?"),
    ('[hosts.a.overrides]\ntrain.lr = "fast"\n',
     "remoteops.toml:2: 'hosts.a.overrides.train.lr' is 'fast'; it must be a number like the "
     "setting it overrides (default 0.0001). Fix it there."),
    ('[hosts.a.overrides]\ntrain.lora_r = 0\n',
     "'hosts.a.overrides.train.lora_r' is 0; it must be a number >= 1"),
    ('[hosts.a.overrides]\nssh.keepalive = 5\n',
     "'hosts.a.overrides.ssh.keepalive' cannot be set per host; overrides take run settings"),
    ('[hosts.a]\noverrides = 3\n', "'hosts.a.overrides' is 3; it must be a table"),
    ('[groups.g]\nhosts = []\n',
     "remoteops.toml:2: 'groups.g.hosts' must be a non-empty list of host names; write "
     "[groups.g] hosts = [\"gpu1\", \"gpu2\"]."),
    ('[groups.g]\nhosts = ["a", "@h"]\n', "list plain hosts"),
    ('[groups.g]\nmembers = ["a"]\n', "'groups.g' has unknown key(s) members"),
])
def test_a_bad_host_table_is_one_line_naming_the_place(project, text, expected):
    with pytest.raises(ConfigError) as err:
        load(project, text)
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_hosts_expand_in_order_each_once_and_overrides_apply_to_their_host(project):
    settings = load(project, '[groups.gpus]\nhosts = ["b", "a"]\n[hosts.a.overrides]\n'
                             'train.lr = 3e-4\ntrain.lora_r = 4.0\n')
    assert expand(settings, "c,@gpus,a") == ["c", "b", "a"]
    with pytest.raises(ConfigError, match="does not define .*@gpus"):
        expand(settings, "@gpu")
    mine = settings_for(settings, "a")
    assert (mine["train.lr"], mine["train.lora_r"], settings["train.lr"]) == (3e-4, 4, 1e-4)
    assert mine.source("train.lr") == "hosts.a.overrides"
    assert settings_for(settings, "b") is settings
    assert folder_name("root@10.0.0.7:2222") == "root_10.0.0.7_2222"


def test_commands_that_take_one_host_say_so_and_an_unknown_group_is_named(cli, project):
    (project / "remoteops.toml").write_text('[groups.gpus]\nhosts = ["a", "b"]\n')
    res = cli("logs", "--host", "@gpus")
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: --host @gpus names several hosts; this command takes one (several work with "
        "precheck, deploy-bundle, rollback, backups, status, runs, cancel, collect and "
        "remote-train).")
    res = cli("status", "--host", "@gpu")
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: --host names group @gpu, which remoteops.toml does not define (groups: @gpus); "
        "add [groups.gpu] hosts = [\"a\", \"b\"].")
