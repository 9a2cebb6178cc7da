"""train.base_model parsed, found in a folder or a hub cache, and judged complete or not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remoteops.common import model_ref as M
from tests.base_model import fakes


@pytest.mark.parametrize("text,kind,name,revision,ambiguous", [
    ("outputs/demo-model", "hf", "outputs/demo-model", "main", True),  # folder if it exists
    ("Qwen/Qwen3-8B", "hf", "Qwen/Qwen3-8B", "main", True),
    ("hf:Qwen/Qwen3-8B", "hf", "Qwen/Qwen3-8B", "main", False),
    ("Qwen/Qwen3-8B@v1.0", "hf", "Qwen/Qwen3-8B", "v1.0", False),
    ("modelscope:Qwen/Qwen2.5-7B", "modelscope", "Qwen/Qwen2.5-7B", "master", False),
    ("ms:Qwen/Qwen2.5-7B@v2", "modelscope", "Qwen/Qwen2.5-7B", "v2", False),
    ("/data/Qwen3-8B", "local", "/data/Qwen3-8B", None, False),
    ("~/models/qwen", "local", "~/models/qwen", None, False),
    ("./models/qwen", "local", "./models/qwen", None, False),
    ("models/qwen/v2", "local", "models/qwen/v2", None, False),
    ("mymodel", "local", "mymodel", None, False),
])
def test_parse(text, kind, name, revision, ambiguous):
    ref = M.parse(text)
    assert (ref.kind, ref.name, ref.revision, ref.ambiguous) == (kind, name, revision, ambiguous)
    again = M.parse(ref.canonical())
    assert again.kind == ref.kind and not again.ambiguous  # the laptop's form is unambiguous
    assert M.local_folder(again, "/p") == M.local_folder(ref, "/p") if kind == "local" else True


@pytest.mark.parametrize("text,words", [
    ("", "empty"), ("   ", "empty"), ("hf:gpt2", "not a valid hub id"),
    ("modelscope:a--b/c", "not a valid hub id"), ("hf:a/b@..", "invalid revision"),
    ("hf:a/../b", "not a valid hub id"),
])
def test_bad_values_say_what_to_write(text, words):
    with pytest.raises(ValueError) as err:
        M.parse(text)
    assert words in str(err.value) and "train.base_model" in str(err.value)


def test_a_bare_org_name_is_the_folder_when_the_project_holds_it(tmp_path):
    ref = M.parse("outputs/demo-model")
    assert M.choose(ref, tmp_path).kind == "hf"
    (tmp_path / "outputs" / "demo-model").mkdir(parents=True)
    chosen = M.choose(ref, tmp_path)
    assert chosen.kind == "local" and chosen.canonical() == "./outputs/demo-model"
    assert M.local_folder(chosen, tmp_path) == str(tmp_path / "outputs" / "demo-model")


def test_hf_cache_location_follows_the_environment(tmp_path):
    home = {"HOME": "/home/u"}
    assert M.hf_hub_cache(home) == "/home/u/.cache/huggingface/hub"
    assert M.hf_hub_cache({**home, "XDG_CACHE_HOME": "/x"}) == "/x/huggingface/hub"
    assert M.hf_hub_cache({**home, "HF_HOME": "/data/hf"}) == "/data/hf/hub"
    assert M.hf_hub_cache({**home, "HF_HOME": "/data/hf", "HF_HUB_CACHE": "/c"}) == "/c"
    assert M.hf_endpoint({}) == "https://huggingface.co"
    assert M.hf_endpoint({"HF_ENDPOINT": "https://hf-mirror.com/"}) == "https://hf-mirror.com"
    assert M.hf_offline({"HF_HUB_OFFLINE": "1"}) and not M.hf_offline({"HF_HUB_OFFLINE": "0"})


def test_hf_snapshot_is_found_through_refs_or_a_commit(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf")}
    snap = fakes.write_hf_cache(tmp_path / "hf" / "hub", "org/tiny", fakes.model_files(2),
                                commit="a" * 40)
    assert M.hf_snapshot(M.parse("org/tiny"), env) == str(snap)
    assert M.hf_snapshot(M.parse("org/tiny@" + "a" * 40), env) == str(snap)
    assert M.hf_snapshot(M.parse("org/tiny@v2"), env) is None  # no refs/v2
    assert M.hf_snapshot(M.parse("org/other"), env) is None
    assert M.inspect_folder(str(snap))["problems"] == []
    # a blob that never arrived: its link dangles, the shard is missing
    blob = Path(os.path.realpath(snap / "model-00002-of-00002.safetensors"))
    blob.unlink()
    problems = M.inspect_folder(str(snap))["problems"]
    assert problems == ["1 of 2 weight shards missing (model-00002-of-00002.safetensors)"]


def test_modelscope_folders(tmp_path):
    ref = M.parse("modelscope:Qwen/Qwen2.5-7B")
    env = {"HOME": "/h"}
    dirs = M.modelscope_dirs(ref, env)
    assert dirs[0] == "/h/.cache/modelscope/hub/models/Qwen/Qwen2___5-7B"
    assert "/h/.cache/modelscope/hub/Qwen/Qwen2.5-7B" in dirs
    env = {"MODELSCOPE_CACHE": str(tmp_path)}
    assert M.cache_folder(ref, env) is None
    folder = fakes.write_folder(tmp_path / "Qwen" / "Qwen2___5-7B", fakes.model_files())
    assert M.cache_folder(ref, env) == str(folder)  # the older layout is found too
    assert M.modelscope_endpoint({"MODELSCOPE_DOMAIN": "mirror.example.com"}) == \
        "https://mirror.example.com"


def _broken(tmp_path, name, change):
    files = fakes.model_files(shards=3)
    change(files)
    return M.inspect_folder(str(fakes.write_folder(tmp_path / name, files)))["problems"]


def test_completeness(tmp_path):
    single = M.inspect_folder(str(fakes.write_folder(tmp_path / "one", fakes.model_files())))
    assert single["problems"] == [] and single["weights"] == ["model.safetensors"]
    sharded = M.inspect_folder(str(fakes.write_folder(tmp_path / "three",
                                                      fakes.model_files(shards=3))))
    assert sharded["problems"] == [] and len(sharded["weights"]) == 3
    assert sharded["expected_bytes"] == 12000
    assert M.inspect_folder(str(tmp_path / "nothing"))["problems"] == ["missing"]
    assert _broken(tmp_path, "a", lambda f: f.pop("config.json")) == ["no config.json"]
    assert _broken(tmp_path, "b", lambda f: [f.pop(n) for n in list(f)
                                             if n.startswith(("model-00002", "model-00003"))]) == [
        "2 of 3 weight shards missing (model-00002-of-00003.safetensors and 1 more)"]
    assert _broken(tmp_path, "c", lambda f: f.pop("tokenizer.json"))[0].startswith("no tokenizer")
    assert _broken(tmp_path, "d", lambda f: f.update({
        "model-00001-of-00003.safetensors": f["model-00001-of-00003.safetensors"][:-100]})) == [
        "model-00001-of-00003.safetensors is truncated (100 bytes short)"]
    assert _broken(tmp_path, "e", lambda f: f.update(
        {"model.safetensors.index.json": b"{not json"})) == [
        "model.safetensors.index.json cannot be read"]
    # partial downloads and our own upload area never count as the model's files
    folder = fakes.write_folder(tmp_path / "f", {**fakes.model_files(), "x.incomplete": b"1",
                                                 ".remoteops-incoming/abc.part": b"2"})
    assert set(M.model_files(str(folder))) == set(fakes.model_files())


def test_hub_downloads_skip_other_runtimes_weights():
    names = ["config.json", "model-00001-of-00002.safetensors", "pytorch_model.bin",
             "original/consolidated.00.pth", "model.gguf", "tokenizer.json", "onnx/model.onnx"]
    assert M.hub_selected(names) == ["config.json", "model-00001-of-00002.safetensors",
                                     "tokenizer.json"]
    assert "pytorch_model.bin" in M.hub_selected(["config.json", "pytorch_model.bin"])


def test_the_trainer_loads_from_the_folder_or_the_cache(tmp_path, monkeypatch):
    from remoteops.common.config import load_settings
    from remoteops.trainer.stageconf import resolve_stage

    project = tmp_path / "proj"
    (project / "data").mkdir(parents=True)
    (project / "data" / "s.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    snap = fakes.write_hf_cache(tmp_path / "hf" / "hub", "org/tiny", fakes.model_files())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def base_model(value):
        (project / "remoteops.toml").write_text(
            f'[train]\nbase_model = "{value}"\n[stages.s]\ndataset = "data/s.jsonl"\n')
        return resolve_stage(load_settings(project, env={}), "s").base_model

    assert base_model("org/tiny") == snap
    assert base_model("outputs/m") == tmp_path / "hf" / "hub" / "models--outputs--m"  # not cached
    (project / "outputs" / "m").mkdir(parents=True)
    assert base_model("outputs/m") == project / "outputs" / "m"
    assert base_model("/abs/model") == Path("/abs/model")
