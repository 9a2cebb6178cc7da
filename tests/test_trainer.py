"""The built-in trainer on the CPU with the tiny demo model (built once per session)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from remoteops.common.config import load_settings  # noqa: E402
from remoteops.common.errors import ConfigError  # noqa: E402
from remoteops.trainer.demo_model import build_demo_model, copy_demo_project  # noqa: E402
from remoteops.trainer.stageconf import resolve_stage  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# A short stage for fault drills and resume: the demo's 6-sample set, 2 steps per epoch.
DRILL = """
[stages.drill]
dataset = "data/sample.jsonl"
eval_set = "data/eval/style.jsonl"
preset = "standard"

[stages.drill.train]
epochs = 3
"""


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("model") / "demo-model", seed=0)


def make_project(root: Path, model: Path, extra: str = "") -> Path:
    copy_demo_project(root)
    (root / "outputs").mkdir(exist_ok=True)
    (root / "outputs" / "demo-model").symlink_to(model, target_is_directory=True)
    if extra:
        with open(root / "remoteops.toml", "a", encoding="utf-8") as fh:
            fh.write(extra)
    return root


@pytest.fixture
def project(tmp_path, demo_model) -> Path:
    return make_project(tmp_path / "proj", demo_model, DRILL)


def agent(project: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
           "REMOTEOPS_USER_CONFIG": str(project / "no-user-config.toml")}
    return subprocess.run([sys.executable, "-m", "remoteops.agent", *args], cwd=project,
                          env=env, capture_output=True, text=True, timeout=300, **kw)


def stage_cfg(project: Path, stage: str, preset: str | None = None, **train):
    settings = load_settings(project, env={"REMOTEOPS_USER_CONFIG": str(project / "none.toml")})
    return resolve_stage(settings, stage, preset, overrides=train or None)


def all_finite_safetensors(folder: Path) -> bool:
    from safetensors.torch import load_file

    files = list(folder.rglob("*.safetensors"))
    assert files, f"no weights under {folder}"
    return all(torch.isfinite(t).all() for f in files for t in load_file(str(f)).values())


# -- training the demo style stage -------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_model):
    from remoteops.trainer.train import run_train

    proj = make_project(tmp_path_factory.mktemp("styleproj") / "proj", demo_model)
    cfg = stage_cfg(proj, "style", "quick")
    run = proj / "outputs" / "training_sync" / "run_style"
    entry = run_train(cfg, run, log=lambda m: None)
    return proj, cfg, run, entry


def test_style_stage_lowers_eval_loss_and_writes_run_files(trained):
    proj, cfg, run, entry = trained
    assert entry["status"] == "done", entry
    assert entry["adapter_eval_loss"] < entry["base_eval_loss"] - 0.3
    assert (run / "style.done").exists() and (run / "style.healthy").exists()
    assert not (run / "style.failed").exists()
    hb = json.loads((run / "heartbeat").read_text())
    assert hb["stage"] == "style" and hb["pid"] == os.getpid() and hb["step"] > 0
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("step", "epoch", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "time"):
        assert col in header
    summary = json.loads((run / "summary.json").read_text())["stages"]["style"]
    assert summary["status"] == "done" and summary["config"]["preset"] == "quick"
    ckpts = summary["checkpoints"]
    assert ckpts and any(c["best"] for c in ckpts) and ckpts[-1]["latest"]
    assert all(c["size"] > 0 for c in ckpts)


def test_adapter_loads_back_with_same_logits(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proj, cfg, run, entry = trained
    adapter = proj / "outputs" / "adapter" / "adapter_style"
    assert (adapter / "adapter_config.json").is_file()
    ids = torch.tensor([[5, 17, 99, 300, 42, 7, 8, 9]])
    base = AutoModelForCausalLM.from_pretrained(str(cfg.base_model))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        lora_logits = model(input_ids=ids).logits
    # The adapter changes the model, and loading it twice gives identical logits.
    assert not torch.allclose(base_logits, lora_logits)
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(cfg.base_model)),
                                      str(adapter)).eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, lora_logits, atol=1e-6)
    # ... and the same as the trainer's own (best) model measured: same eval loss
    # (the Trainer averages per-sample losses with batch size 1).
    from remoteops.trainer.evaluate import mean_loss
    from remoteops.trainer.train import prepare
    prep = prepare(cfg)
    per_sample = [mean_loss(model, [ex]) for ex in prep.eval]
    assert sum(per_sample) / len(per_sample) == pytest.approx(entry["adapter_eval_loss"], rel=1e-5)


def test_checkpoints_command_lists_best_and_latest(trained):
    proj, cfg, run, entry = trained
    res = agent(proj, "checkpoints", "--stage", "style", "--run-dir", str(run), "--json")
    assert res.returncode == 0, res.stderr
    items = json.loads(res.stdout)["checkpoints"]
    assert [c["latest"] for c in items][-1] is True and any(c["best"] for c in items)


def test_eval_report_has_metrics_and_target_verdicts(trained):
    from remoteops.trainer.evaluate import run_eval

    proj, cfg, run, entry = trained
    report = run_eval(cfg, run, log=lambda m: None)
    saved = json.loads((run / "eval_report_style.json").read_text())
    assert saved["metrics"]["eval_loss"] < saved["metrics"]["base_eval_loss"]
    assert saved["metrics"]["perplexity"] == pytest.approx(math.exp(saved["metrics"]["eval_loss"]))
    assert set(saved["targets"]) == {"coverage", "format"}
    assert saved["targets"]["coverage"]["target"] == 0.90
    assert all(t["status"] in ("pass", "miss") for t in saved["targets"].values())
    assert len(saved["items"]) == 6 and report["pass"] == saved["pass"]


# -- the health watch --------------------------------------------------------------
def test_injected_nan_stops_before_the_step_and_exits_nonzero(project):
    with open(project / "remoteops.toml", "a", encoding="utf-8") as fh:
        fh.write('inject_fault = "nan@3"\n')   # lands in [stages.drill.train]
    res = agent(project, "train", "--stage", "drill", "--run-dir", "outputs/training_sync/run_nan")
    assert res.returncode == 1, res.stdout + res.stderr
    run = project / "outputs" / "training_sync" / "run_nan"
    failed = json.loads((run / "drill.failed.json").read_text())
    assert failed["reason"] == "nan" and failed["step"] == 3
    assert (run / "drill.failed").read_text().strip() == "nan"
    assert not (run / "drill.done").exists()
    ckpt_dir = run / "checkpoints" / "drill"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint-2"]  # nothing saved after
    assert all_finite_safetensors(ckpt_dir)
    assert not (project / "outputs" / "adapter" / "adapter_drill").exists()
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert [r[3] for r in rows if r[1] == "3"] == ["nan"]  # logged for the record, never applied
    assert max(int(r[1]) for r in rows) == 3


@pytest.mark.parametrize("fault,reason", [("lr", "lr_zero"), ("explode@2", "divergence")])
def test_lr_zero_and_exploding_loss_are_caught(project, fault, reason):
    from remoteops.trainer.train import run_train

    overrides = {"lr": 0.0} if fault == "lr" else {"inject_fault": fault}
    cfg = stage_cfg(project, "drill", **overrides)
    run = project / "outputs" / "training_sync" / "run_fault"
    entry = run_train(cfg, run, log=lambda m: None)
    assert entry["status"] == "failed" and entry["reason"] == reason
    failed = json.loads((run / "drill.failed.json").read_text())
    assert failed["reason"] == reason
    assert failed["step"] == (1 if fault == "lr" else 2)
    assert not list((run / "checkpoints" / "drill").glob("checkpoint-*"))


def test_oom_is_classified(project):
    from remoteops.trainer.train import run_train

    cfg = stage_cfg(project, "drill", inject_fault="oom@2")
    entry = run_train(cfg, project / "run_oom", log=lambda m: None)
    assert entry["status"] == "failed" and entry["reason"] == "oom"
    assert json.loads((project / "run_oom" / "drill.failed.json").read_text())["reason"] == "oom"


def test_kill_after_checkpoint_then_resume_matches_uninterrupted(project):
    ref = agent(project, "train", "--stage", "drill", "--run-dir", "outputs/training_sync/run_ref")
    assert ref.returncode == 0, ref.stdout + ref.stderr
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
           "REMOTEOPS_USER_CONFIG": str(project / "none.toml")}
    proc = subprocess.Popen([sys.executable, "-m", "remoteops.agent", "train", "--stage", "drill",
                             "--run-dir", "outputs/training_sync/run_cut"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "checkpoint saved" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    cut = project / "outputs" / "training_sync" / "run_cut"
    assert not (cut / "drill.done").exists()
    res = agent(project, "train", "--stage", "drill", "--resume", "latest")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming stage 'drill'" in res.stdout and str(cut) in res.stdout
    final = lambda run: json.loads((run / "summary.json").read_text())["stages"]["drill"]  # noqa: E731
    ref_entry = final(project / "outputs" / "training_sync" / "run_ref")
    cut_entry = final(cut)
    assert cut_entry["status"] == "done" and cut_entry["resumed_from"].endswith("checkpoint-2")
    assert (cut / "drill.done").exists() and (cut / "drill.healthy").exists()
    assert cut_entry["final"]["step"] == ref_entry["final"]["step"] == 6
    assert cut_entry["final"]["loss"] == pytest.approx(ref_entry["final"]["loss"], rel=1e-4)
    assert cut_entry["final"]["eval_loss"] == pytest.approx(ref_entry["final"]["eval_loss"], rel=1e-4)


# -- dry run, data errors, QLoRA without CUDA ---------------------------------------
def test_dry_run_names_file_and_line_of_a_malformed_line(project):
    lines = (project / "data" / "sample.jsonl").read_text(encoding="utf-8").splitlines()
    lines.insert(2, '{"messages": [{"role": "user", "content": "hi"}')  # broken JSON, line 3
    (project / "data" / "broken.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(project / "remoteops.toml", "a", encoding="utf-8") as fh:
        fh.write('\n[stages.broken]\ndataset = "data/broken.jsonl"\n')
    res = agent(project, "train", "--stage", "broken", "--dry-run")
    assert res.returncode == 2
    assert "data/broken.jsonl:3: invalid JSON" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (project / "outputs" / "training_sync").exists()  # dry run wrote nothing


def test_dry_run_skips_bad_lines_up_to_the_limit_and_reports_plan(project, capsys):
    from remoteops.trainer.train import dry_run

    path = project / "data" / "sample.jsonl"
    path.write_text(path.read_text(encoding="utf-8") + '{"instruction": "x"}\n', encoding="utf-8")
    lines = []
    info = dry_run(stage_cfg(project, "drill", max_bad_lines=1), log=lines.append)
    assert info["samples"] == 6 and info["skipped_lines"] == 1
    assert info["total_steps"] == 6 and info["memory_estimate_gb"] > 0
    assert any("data/sample.jsonl:7: 'output' must be a non-empty string" in ln for ln in lines)
    with pytest.raises(ConfigError, match=r"data/sample.jsonl:7"):
        dry_run(stage_cfg(project, "drill"), log=lines.append)


def test_qlora_without_cuda_is_an_error_unless_fallback_allowed(project):
    from remoteops.trainer.train import dry_run

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        dry_run(stage_cfg(project, "drill", quantization="qlora"), log=lambda m: None)
    lines: list[str] = []
    info = dry_run(stage_cfg(project, "drill", quantization="qlora", qlora_fallback=True),
                   log=lines.append)
    assert info["qlora"] is False and any("falling back to plain LoRA" in ln for ln in lines)


def test_unknown_stage_override_key_is_a_config_error(project):
    with open(project / "remoteops.toml", "a", encoding="utf-8") as fh:
        fh.write("epoch = 3\n")
    with pytest.raises(ConfigError, match=r"stages.drill.train.epoch'.*Did you mean 'epochs'"):
        stage_cfg(project, "drill")


# -- evaluation arithmetic (no model) ------------------------------------------------
def test_eval_metrics_with_a_fake_generator_are_exact():
    from remoteops.trainer.evaluate import evaluate_answers

    items = [
        {"prompt": "q1", "key_points": ["高斯面", ["E=0", "场强为零"], "球心"],
         "format_rules": [{"rule": "sections", "value": ["思路", "结论"]},
                          {"rule": "language", "value": "zh"}, {"rule": "latex"},
                          {"rule": "max_chars", "value": 60}]},
        {"prompt": "q2", "key_points": ["Future Work", "limitation"],
         "format_rules": [{"rule": "list"}, {"rule": "language", "value": "en"},
                          {"rule": "code_block"}, {"rule": "min_chars", "value": 10}]},
    ]
    answers = {"q1": "思路：取 高斯 面。\n结论：球内 场强为零，$E=0$。",
               "q2": "Key points:\n1. State each LIMITATION.\n2. future  work."}
    report = evaluate_answers(items, lambda it: answers[it["prompt"]],
                              {"coverage": 0.8, "format": 0.75})
    # q1: 高斯面 (spaces normalised away) and E=0 hit, 球心 missed; q2: both hit -> 4/5.
    assert report["key_points_hit"] == 4 and report["key_points"] == 5
    assert report["coverage"] == 4 / 5
    # q1: all 4 rules; q2: list, en, min_chars pass, code_block fails -> 7/8.
    assert report["rules_passed"] == 7 and report["format"] == 7 / 8
    assert report["items"][0]["key_points_missed"] == ["球心"]
    assert report["targets"]["coverage"]["status"] == "pass"
    assert report["targets"]["format"]["status"] == "pass"
    # Different answers, different metrics.
    answers["q1"] = "I do not know."
    worse = evaluate_answers(items, lambda it: answers[it["prompt"]],
                             {"coverage": 0.8, "format": 0.75})
    assert worse["coverage"] == 2 / 5 and worse["format"] == 4 / 8
    assert worse["targets"]["coverage"]["status"] == "miss" and worse["pass"] is False


# -- log-based checker ---------------------------------------------------------------
def test_log_checker_catches_nan_traceback_oom_and_stale(tmp_path):
    from remoteops.server.logwatch import check_log, check_text

    ok = check_text("{'loss': '6.9', 'eval_loss': '6.8'}\n{'loss': '6.1'}\n")
    assert ok.ok and ok.losses == [6.9, 6.1]
    nan = check_text("step 1 loss=2.5\nstep 2 loss=nan\nstep 3 loss=2.4\n")
    assert not nan.ok and nan.reason == "nan" and nan.line == 2
    custom = check_text("it 1 | L 3.0\nit 2 | L inf\n", pattern=r"\| L ([\w.]+)")
    assert custom.reason == "nan"
    tb = check_text("loss: 1.0\nTraceback (most recent call last):\n  File \"t.py\", line 1\n"
                    "KeyError: 'input_ids'\n", exit_code=1)  # a crash: judged as it ends
    assert tb.reason == "traceback" and "KeyError" in tb.message
    oom = check_text("Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of "
                     "memory. Tried to allocate 2.00 GiB\n", exit_code=1)
    assert oom.reason == "oom"
    assert check_text("RuntimeError: CUDA error: device-side assert triggered",
                      exit_code=1).reason == "cuda"
    assert check_text("loss=1.0\nloss=0.5\nloss=90\n").reason == "divergence"
    log = tmp_path / "train.log"
    log.write_text("loss=1.0\n")
    hb = tmp_path / "heartbeat"
    hb.write_text(json.dumps({"time": 1000.0}))
    os.utime(log, (1000, 1000))
    os.utime(hb, (1000, 1000))
    stale = check_log(log, hb, stale_seconds=60, now=2000.0)
    assert stale.reason == "stale" and stale.age_s == 1000.0
    assert check_log(log, hb, stale_seconds=60, now=1030.0).ok


def test_health_callback_guards_a_users_own_trainer(project, demo_model):
    """A plain transformers.Trainer with our callback: NaN never reaches the weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from remoteops.trainer.health import HealthCallback
    from remoteops.trainer.train import prepare

    prep = prepare(stage_cfg(project, "drill"))

    class UserTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss * float("nan") if self.state.global_step == 1 else loss

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(demo_model)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    seen = []
    health = HealthCallback(on_failure=lambda reason, msg, step: seen.append((reason, step)))
    args = TrainingArguments(output_dir=str(project / "user"), max_steps=4, logging_steps=1,
                             per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             learning_rate=1e-2, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    from remoteops.trainer.data import Collator
    trainer = UserTrainer(model=model, args=args, train_dataset=prep.train,
                          data_collator=Collator(prep.tokenizer.pad_token_id), callbacks=[health])
    trainer.train()
    assert seen == [("nan", 2)] and trainer.state.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_make_demo_model_command_is_deterministic(tmp_path, demo_model):
    res = agent(tmp_path, "make-demo-model", "--out", str(tmp_path / "m"), "--seed", "0")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == \
        (demo_model / "model.safetensors").read_bytes()
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == \
        (demo_model / "tokenizer.json").read_bytes()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["hidden_size"] == 256


def test_optional_stagnation_rule_is_off_by_default_and_fires_when_set():
    from remoteops.trainer.health import HealthCallback

    losses = [3.0, 2.5, 2.6, 2.55, 2.7, 2.52]
    off = HealthCallback()
    assert all(off.judge(i + 1, loss) is None for i, loss in enumerate(losses))
    on = HealthCallback(stagnation_steps=3)
    verdicts = [on.judge(i + 1, loss) for i, loss in enumerate(losses)]
    assert verdicts[:4] == [None, None, None, None]
    assert verdicts[4][0] == "stagnation" and "2.5" in verdicts[4][1]
    strict = HealthCallback(stagnation_steps=2, stagnation_min_delta=0.6)
    assert strict.judge(1, 3.0) is None and strict.judge(2, 2.5) is None  # 0.5 < delta
    assert strict.judge(3, 2.45)[0] == "stagnation"


def test_targets_come_from_the_config_not_from_the_stage_name(tmp_path):
    # A stage called "writing" used to get hidden seed targets (0.85/0.90) whatever the
    # config said; now a stage without targets gets eval.coverage_target/format_target,
    # and the demo states its seed targets in its own remoteops.toml.
    root = tmp_path / "p"
    copy_demo_project(root)
    (root / "remoteops.toml").write_text(
        '[eval]\ncoverage_target = 0.5\nformat_target = 0.6\n'
        '[stages.writing]\ndataset = "data/writing.jsonl"\n')
    assert stage_cfg(root, "writing").targets == {"coverage": 0.5, "format": 0.6}
    demo = tmp_path / "demo"
    copy_demo_project(demo)
    assert stage_cfg(demo, "writing").targets == {"coverage": 0.85, "format": 0.90}


def test_kbit_preparation_checkpoints_without_the_use_reentrant_warning_cpu_standin(
        demo_model):
    """QLoRA's preparation (gradient checkpointing on) as ``build_model`` runs it, on the
    float demo model: the 4-bit base needs CUDA, the checkpointed step does not. A training
    step runs through torch's checkpoint without its use_reentrant warning (peft alone
    leaves it unset; on a GPU the warning lands in every QLoRA stage's log)."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from remoteops.trainer.train import prepare_for_kbit

    model = AutoModelForCausalLM.from_pretrained(str(demo_model))
    model.is_loaded_in_4bit = True  # the stand-in: what bitsandbytes' loading marks (CUDA)
    model = prepare_for_kbit(model)
    assert model.is_gradient_checkpointing
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"],
                                             task_type="CAUSAL_LM"))
    model.train()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(input_ids=ids, labels=ids).loss.backward()
    assert not [w for w in seen if "use_reentrant" in str(w.message)]
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "lora_" in n)
