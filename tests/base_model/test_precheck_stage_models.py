"""precheck checks every distinct base model the planned training stages use, each once: the
top-level train.base_model, and a stage's own ([stages.X.train] base_model), whose rows name
the stage(s). A stage outside the plan is not checked; a model no stage uses is not either."""

from __future__ import annotations

import json
import sys

from remoteops.common.config import load_settings
from remoteops.common.target import LocalTarget
from remoteops.plugins import PluginManager, builtin_dir, load_file
from remoteops.precheck import run_precheck
from tests.base_model import fakes

DATA = '{"instruction": "a", "output": "b"}\n'


def _rows(laptop, server, toml):
    (laptop / "remoteops.toml").write_text(toml)
    pm = PluginManager()
    path = builtin_dir() / "base_model.py"
    pm.register_module(load_file(path, "base_model"), "base_model", "builtin", str(path), "t")
    settings = load_settings(laptop, env={})
    rows = run_precheck(settings, LocalTarget("gpu", str(server), sys.executable), pm)
    return {r.name: r.to_dict() for r in rows}


def test_a_stages_own_model_missing_on_the_server_is_named_with_its_stages(tmp_path):
    laptop, server = tmp_path / "laptop", tmp_path / "server"
    (laptop / "data").mkdir(parents=True)
    (laptop / "data" / "s.jsonl").write_text(DATA)
    fakes.write_folder(server / "outputs" / "demo-model", fakes.model_files())
    fakes.write_folder(laptop / "outputs" / "other-model", fakes.model_files(2))
    stage = '[stages.{0}]\ndataset = "data/s.jsonl"\n'
    toml = ('[train]\nbase_model = "outputs/demo-model"\n'
            '[pipeline]\nstages = ["precheck", "style", "writing", "all", "collect"]\n'
            + stage.format("style")
            + stage.format("writing") + '[stages.writing.train]\nbase_model = '
            '"outputs/other-model"\n'
            + stage.format("all") + '[stages.all.train]\nbase_model = "outputs/other-model"\n'
            + stage.format("later") + '[stages.later.train]\nbase_model = "/nowhere/m"\n')
    rows = _rows(laptop, server, toml)
    assert set(rows) == {"base model", "base model (writing, all)",
                         "base model disk (writing, all)"}, rows
    assert rows["base model"]["status"] == "ok"
    assert "outputs/demo-model: " in rows["base model"]["value"]
    row = rows["base model (writing, all)"]
    assert row["status"] == "fail"
    assert row["value"] == (f"outputs/other-model is not on the server (no folder "
                            f"{server}/outputs/other-model)")
    assert row["hint"].startswith("run `invoke fetch-model --host gpu --from-laptop`")
    assert rows["base model disk (writing, all)"]["status"] == "ok"

    # a stage that names the top-level model again adds no row; once every planned stage has
    # its own, the top-level one (used by none) is not checked
    toml = ('[train]\nbase_model = "/nowhere/unused"\n'
            '[pipeline]\nstages = ["precheck", "style", "writing"]\n'
            + stage.format("style") + '[stages.style.train]\nbase_model = "outputs/demo-model"\n'
            + stage.format("writing") + '[stages.writing.train]\nbase_model = '
            '"outputs/demo-model"\n')
    rows = _rows(laptop, server, toml)
    assert list(rows) == ["base model (style, writing)"], rows
    assert rows["base model (style, writing)"]["status"] == "ok"

    toml = ('[train]\nbase_model = "outputs/demo-model"\n[pipeline]\nstages = ["style"]\n'
            + stage.format("style") + '[stages.style.train]\nbase_model = "outputs/demo-model"\n')
    rows = _rows(laptop, server, toml)
    assert list(rows) == ["base model"] and rows["base model"]["status"] == "ok"


def test_the_stage_row_over_ssh_in_json(cli, home, project, sshd_server, tmp_path):
    """The same through the laptop's precheck over a real sshd, as --json."""
    from tests.conftest import ssh_alias, trust

    ssh_alias(home, "box", sshd_server)
    trust(project, sshd_server)
    root = tmp_path / "srv"
    fakes.write_folder(root / "outputs" / "demo-model", fakes.model_files())
    (project / "data").mkdir()
    (project / "data" / "s.jsonl").write_text(DATA)
    (project / "remoteops.toml").write_text(
        '[train]\nbase_model = "outputs/demo-model"\n[pipeline]\nstages = ["precheck", "a", '
        '"b"]\n[stages.a]\ndataset = "data/s.jsonl"\n[stages.b]\ndataset = "data/s.jsonl"\n'
        '[stages.b.train]\nbase_model = "./models/b"\n')
    env = {"REMOTEOPS_REMOTE_PYTHON": sys.executable, "REMOTEOPS_GPU_GATE": "off"}
    res = cli("precheck", "--host", "box", "--project-root", str(root), "--json", env=env,
              timeout=300)
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["base model"]["status"] == "ok"
    row = checks["base model (b)"]
    assert row["status"] == "fail" and row["value"] == (
        f"./models/b is not on the server (no folder {root}/models/b)")
    assert row["hint"].startswith("fix [stages.b.train] base_model: a folder on the server")
