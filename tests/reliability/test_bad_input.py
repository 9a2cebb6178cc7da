"""Bad input gets one line that names where it is and what to do, and changes nothing.

Each case runs the real ``remoteops`` command. On the code before this test
these cases either built a bundle from a bad config (and failed later, on the
server, with a traceback) or crashed with a traceback right away.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def one_line_error(res) -> str:
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


# (remoteops.toml text, the key the message must name, the line it must point at, a word of
# the fix)
CASES = [
    ('[stages]\nx = "str"\n', "stages.x", 2, "must be a table"),
    ('stages.x = "str"\n', "stages.x", 1, "must be a table"),
    ('[hosts.gpu]\nhost = "h"\nport = "twenty-two"\n', "hosts.gpu.port", 3, "port = 22"),
    ('[hosts.gpu]\nhost = "h"\nport = 70000\n', "hosts.gpu.port", 3, "1 to 65535"),
    ('\n[bundle]\ncompression_level = 99\n', "bundle.compression_level", 3, "<= 22"),
    ('[pipeline]\nheartbeat_seconds = 0\n', "pipeline.heartbeat_seconds", 2, "> 0"),
    ('pipeline = { poll_seconds = 0 }\n', "pipeline.poll_seconds", 1, "> 0"),
    ('[pipeline]\nmax_retries = -1\n', "pipeline.max_retries", 2, ">= 0"),
    ('[pipeline]\nheartbeat_seconds = nan\n', "pipeline.heartbeat_seconds", 2, "finite"),
    ('[ssh]\nkeepalive = -1\n', "ssh.keepalive", 2, ">= 0"),
    ('[ssh]\ncommand_timeout = 0\n', "ssh.command_timeout", 2, "> 0"),
    ('[ssh]\nconnect_retries = -2\n', "ssh.connect_retries", 2, ">= 0"),
    ('[ssh]\nconnect_retries = 1.5\n', "ssh.connect_retries", 2, "an integer"),
    ('[deploy]\nkeep_backups = 0\n', "deploy.keep_backups", 2, ">= 1"),
    ('[deploy]\nkeep_backups = true\n', "deploy.keep_backups", 2, "an integer"),
    ('[health]\nstale_seconds = 0\n', "health.stale_seconds", 2, "> 0"),
    ('[health]\nloss_pattern = "loss"\n', "health.loss_pattern", 2, "one group"),
    ('[train]\nbatch_size = 0\n', "train.batch_size", 2, ">= 1"),
    ('[train]\nquantization = "int3"\n', "train.quantization", 2, "none, qlora"),
    ('[eval]\ncoverage_target = 1.5\n', "eval.coverage_target", 2, "<= 1"),
    ('gpu_gate = "maybe"\n', "gpu_gate", 1, "strict, warn, off"),
    ('[pipeline]\nstages = ["a", 2]\n', "pipeline.stages", 2, "list of strings"),
    ('[stages.style]\ndataset = "d"\nkind = "bogus"\n', "stages.style.kind", 3, "one of"),
    ('[stages.style]\ndataset = "d"\n\n[stages.style.train]\nlr = -1\n',
     "stages.style.train.lr", 5, ">= 0"),
    ('[stages.style]\ndataset = "d"\n[stages.style.train]\nbatch = 2\n',
     "stages.style.train.batch", 4, "batch_size"),
    ('[stages.style]\ndataset = "d"\n[stages.style.targets]\ncoverage = 2\n',
     "stages.style.targets.coverage", 4, "<= 1"),
    ('[plugins]\nquant_gguf = true\n', "plugins.quant_gguf", 2, "must be a table"),
]


@pytest.mark.parametrize("text, key, line, fix", CASES, ids=[c[1] + str(i) for i, c in
                                                                  enumerate(CASES)])
def test_bad_setting_is_one_line_with_file_line_and_fix(cli, project, text, key, line, fix):
    (project / "remoteops.toml").write_text(text)
    (project / "train.py").write_text("print(1)\n")
    before = listing(project)
    msg = one_line_error(cli("build-bundle"))
    assert f"remoteops.toml:{line}:" in msg and f"'{key}'" in msg and fix in msg, msg
    assert listing(project) == before  # no bundles/ folder, nothing written


def test_bad_port_fails_before_connecting(cli, project):
    (project / "remoteops.toml").write_text('[hosts.gpu]\nhost = "127.0.0.1"\n'
                                            'port = "twenty-two"\n')
    msg = one_line_error(cli("precheck", "--host", "gpu"))
    assert "remoteops.toml:3:" in msg and "hosts.gpu.port" in msg and "port = 22" in msg
    assert listing(project) == ["remoteops.toml"]


def test_bad_value_from_the_environment_names_the_variable(cli, project):
    msg = one_line_error(cli("config", env={"REMOTEOPS_PIPELINE__HEARTBEAT_SECONDS": "0"}))
    assert msg.startswith("error: env REMOTEOPS_PIPELINE__HEARTBEAT_SECONDS:") and "> 0" in msg
    msg = one_line_error(cli("config", env={"REMOTEOPS_HOSTS__GPU__PORT": "twenty-two"}))
    assert "env REMOTEOPS_HOSTS__GPU__PORT" in msg and "hosts.gpu.port" in msg


def test_pyproject_tool_table_line_is_found(cli, project):
    (project / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.remoteops.deploy]\n'
                                            'keep_backups = 0\n')
    msg = one_line_error(cli("config"))
    assert "pyproject.toml:5:" in msg and "deploy.keep_backups" in msg


def test_a_good_config_still_loads(cli, project):
    (project / "remoteops.toml").write_text(
        '[hosts.gpu]\nhost = "h"\nport = 2222\n[pipeline]\nheartbeat_seconds = 0.5\n'
        '[stages.style]\ndataset = "d"\nkind = "train"\noutputs = ["x"]\n'
        '[stages.style.train]\nlr = 2e-4\nepochs = 1\n[ssh]\nkeepalive = 0\n')
    res = cli("config", "--json", env={"REMOTEOPS_HOSTS__GPU__PORT": "2200"})
    assert res.returncode == 0, res.stderr


def test_non_utf8_file_name_is_refused_in_one_line(cli, project):
    (project / "train.py").write_text("print(1)\n")
    (project / "data").mkdir()
    os.close(os.open(os.fsencode(project / "data") + b"/caf\xe9.txt", os.O_CREAT | os.O_WRONLY))
    before = listing(project)
    msg = one_line_error(cli("build-bundle"))
    assert "b'" in msg and "data/caf\\xe9.txt'" in msg and "rename" in msg, msg
    assert listing(project) == before
    # left out on purpose, the rest builds
    (project / "remoteops.toml").write_text('[bundle]\nexclude = ["data/caf*"]\n')
    res = cli("build-bundle")
    assert res.returncode == 0, res.stderr
    assert "bundle.exclude (1: data/caf" in res.stdout
