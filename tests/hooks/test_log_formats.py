"""Real log lines from each trainer, written after each project's documented output format, and
the verdict the log watch of a command stage must give each (table-driven).

Sources of the formats: transformers' ``Trainer.log`` (a dict per ``logging_steps``; numbers
as strings in transformers 5), LLaMA-Factory and axolotl (the same dicts, with their extra
keys), PyTorch Lightning's tqdm and rich progress bars (``v_num`` and logged metrics in the
postfix), torchtune's recipes (the tqdm description ``epoch|step|Loss: x`` and the stdout
metric logger ``Step N | key:value``), and a plain training loop's ``print``.
"""

from __future__ import annotations

import math

import pytest

from remoteops.server.logwatch import LogWatch, check_text, parse_losses

BAR = "\r 10%|█         | 10/100 [00:05<00:45,  2.00it/s]"
PL_TQDM = "Epoch 0:  40%|████      | 4/10 [00:00<00:00, 12.34it/s, v_num=0, {}]"
PL_RICH = ("Epoch 0/9  ━━━━━━━━━━━━━━━━╸━━━━━━━━━━━━━━━━━ 4/10 0:00:01 • 0:00:02 4.56it/s "
           "v_num: 0 {}")

OVERFLOW = "{'loss': 1.7, 'grad_norm': inf, 'learning_rate': 1e-4, 'epoch': 0.5}\n"

# (name, log text, exit code or None while running, verdict, text the message must hold)
CASES = [
    # -- HF Trainer (transformers 4 and 5), LLaMA-Factory, axolotl -------------------------
    ("hf4 clean", "{'loss': 2.3456, 'grad_norm': 1.8754, 'learning_rate': 4.9e-05, "
                  "'epoch': 0.04}\n{'loss': 2.1, 'grad_norm': 1.5, 'learning_rate': 4.8e-05, "
                  "'epoch': 0.08}\n", None, "ok", ""),
    ("hf4 nan loss", "{'loss': nan, 'grad_norm': nan, 'learning_rate': 4.9e-05, "
                     "'epoch': 0.04}\n", None, "nan", "loss is nan"),
    ("llama-factory zero loss, nan grad_norm",
     "{'loss': 1.9, 'grad_norm': 3.2, 'learning_rate': 5e-05, 'epoch': 0.13, "
     "'num_input_tokens_seen': 8192}\n{'loss': 0.0, 'grad_norm': nan, 'learning_rate': 4.9e-05, "
     "'epoch': 0.27, 'num_input_tokens_seen': 16384}\n", None, "nan", "gradient norm is nan"),
    # an fp16 loss scaler's skipped steps: inf grad_norm beside a normal loss, 3 in a row pass
    ("hf fp16 overflow, 3 steps in a row", OVERFLOW * 3 + "{'loss': 1.6, 'grad_norm': 2.0}\n"
     + OVERFLOW * 3, None, "ok", ""),
    ("hf inf grad_norm, 4 steps in a row", OVERFLOW * 4, None, "nan",
     "gradient norm is inf at step 4, 4 steps in a row"),
    ("hf inf grad_norm with a zero loss", "{'loss': 0.0, 'grad_norm': inf, 'epoch': 0.5}\n",
     None, "nan", "gradient norm is inf at step 1"),
    ("transformers 5 strings", "{'loss': '0.0', 'grad_norm': 'nan', 'learning_rate': "
                               "'4.9e-05', 'epoch': '0.27'}\n", None, "nan",
     "gradient norm is nan"),
    ("transformers 5 strings clean", "{'loss': '2.346', 'grad_norm': '1.875', "
                                     "'learning_rate': '4.9e-05', 'epoch': '0.04'}\n", None,
     "ok", ""),
    ("hf dict after a tqdm bar", f"{BAR}{{'loss': 0.0, 'grad_norm': nan, 'epoch': 0.1}}\n",
     None, "nan", "gradient norm is nan"),
    ("axolotl memory keys", "{'loss': 1.2345, 'grad_norm': 0.456, 'learning_rate': 2e-05, "
                            "'memory/max_active (GiB)': 10.5, 'memory/device_reserved (GiB)': "
                            "12.0, 'epoch': 0.5}\n", None, "ok", ""),
    ("hf json line", '{"loss": NaN, "grad_norm": 1.0, "step": 7}\n', None, "nan",
     "loss is nan at step 7"),
    ("hf eval and summary dicts are not steps",
     "{'eval_loss': nan, 'eval_runtime': 1.2, 'epoch': 1.0}\n{'train_runtime': 60.1, "
     "'train_samples_per_second': 3.3, 'train_loss': nan, 'epoch': 1.0}\n", None, "ok", ""),
    ("hf explosion", "{'loss': 2.0, 'grad_norm': 1.0}\n{'loss': 1.8, 'grad_norm': 1.0}\n"
                     "{'loss': 250.0, 'grad_norm': 900.0}\n", None, "divergence", "over 10x"),
    ("hf above loss_max", "{'loss': 12345.0, 'grad_norm': 1.0}\n", None, "divergence",
     "above health.loss_max"),
    # -- PyTorch Lightning ------------------------------------------------------------------
    ("lightning tqdm train_loss=nan", PL_TQDM.format("train_loss=nan") + "\n", None, "nan",
     "loss is nan"),
    ("lightning tqdm redraws with \\r only", "\r".join(
        PL_TQDM.format(f"train_loss={v}") for v in ("2.310", "2.120", "nan")), None, "nan",
     "loss is nan"),
    ("lightning 1.x loss=", "Epoch 1:  50%|█████     | 5/10 [00:01<00:01,  4.12it/s, "
                            "loss=inf, v_num=3]\n", None, "nan", "loss is inf"),
    ("lightning rich bar", PL_RICH.format("train_loss: nan") + "\n", None, "nan", "loss is nan"),
    ("lightning epoch end: val_loss nan is not a training step",
     "Epoch 0: 100%|██████████| 10/10 [00:02<00:00,  4.50it/s, v_num=0, train_loss_step=2.100, "
     "val_loss=nan, train_loss_epoch=2.300]\n", None, "ok", ""),
    ("lightning validation bar", "Validation DataLoader 0: 100%|██████████| 2/2 "
                                 "[00:00<00:00, 50.00it/s]\n", None, "ok", ""),
    # -- torchtune --------------------------------------------------------------------------
    ("torchtune bar", "1|3|Loss: 2.3456:   0%|          | 3/1000 [00:05<28:10,  1.70s/it]\r"
                      "1|4|Loss: nan:   0%|          | 4/1000 [00:07<28:10,  1.70s/it]\n",
     None, "nan", "loss is nan at step 4"),
    ("torchtune metric logger", "Step 3 | loss:2.3456 lr:2e-05 tokens_per_second_per_gpu:"
                                "1234.5 peak_memory_active:12.3\nStep 4 | loss:2.2 lr:2e-05 "
                                "grad_norm:nan\n", None, "nan", "gradient norm is nan at step 4"),
    # -- a plain loop -----------------------------------------------------------------------
    ("plain step N loss X", "step 1 loss 2.34\nstep 2 loss 2.10\nstep 3 loss nan\n", None,
     "nan", "loss is nan at step 3"),
    ("plain key=value", "step 11 | loss=1.5 | lr=1e-4 | grad_norm=0.5\n"
                        "step 12 | loss=inf | lr=1e-4\n", None, "nan", "loss is inf at step 12"),
    ("plain train_loss", "epoch 1 step 40 train_loss: nan\n", None, "nan", "loss is nan"),
    ("plain eval/val losses are not steps", "eval loss: nan\nval_loss=nan\n", None, "ok", ""),
    ("plain explosion", "loss=1.0\nloss=0.5\nloss=90\n", None, "divergence", "over 10x"),
    # -- crashes: judged when the process ends ----------------------------------------------
    ("traceback while running is a warning",
     "step 1 loss 2.0\nTraceback (most recent call last):\n  File \"log.py\", line 3, in emit\n"
     "    self.stream.write(msg)\nBrokenPipeError: [Errno 32] Broken pipe\nstep 2 loss 1.9\n",
     None, "ok", ""),
    ("the same process exiting 0", "Traceback (most recent call last):\n  File \"x.py\", "
                                   "line 1\nKeyError: 'x'\nstep 2 loss 1.9\n", 0, "ok", ""),
    ("a crash names its last line",
     "step 1 loss 2.0\nTraceback (most recent call last):\n  File \"train.py\", line 9, in "
     "<module>\n    batch = next(it)\nKeyError: 'input_ids'\n", 1, "traceback",
     "KeyError: 'input_ids'"),
    ("a chained crash names the last exception",
     "Traceback (most recent call last):\n  File \"a.py\", line 1\nValueError: bad\n\n"
     "During handling of the above exception, another exception occurred:\n\n"
     "Traceback (most recent call last):\n  File \"a.py\", line 3\nRuntimeError: gave up\n",
     1, "traceback", "RuntimeError: gave up"),
    ("an OOM crash", "Traceback (most recent call last):\n  File \"train.py\", line 9\n"
                     "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n",
     1, "oom", "CUDA out of memory"),
    ("a CUDA crash without a traceback", "RuntimeError: CUDA error: device-side assert "
                                         "triggered\n", 1, "cuda", "device-side assert"),
    ("an OOM a batch-size finder survived", "RuntimeError: CUDA out of memory. Tried to "
                                            "allocate 8.00 GiB\nstep 1 loss 2.0\n", None, "ok",
     ""),
    ("a survived traceback does not explain a later kill",
     "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'x'\n"
     + "".join(f"step {i} loss 1.{i % 10}\n" for i in range(1, 80)), 137, "ok", ""),
]


@pytest.mark.parametrize("name,text,exit_code,verdict,message", CASES,
                         ids=[c[0] for c in CASES])
def test_each_trainers_log_lines_get_their_verdict(name, text, exit_code, verdict, message):
    got = check_text(text, exit_code=exit_code)
    assert (got.reason or "ok") == verdict, (got.reason, got.message)
    assert message in got.message, got.message
    # fed in small pieces as the runner reads a pipe, the verdict is the same
    watch = LogWatch()
    for i in range(0, len(text), 7):
        watch.feed_bytes(text[i:i + 7].encode())
    watch.close()
    assert (watch.verdict(exit_code).reason or "ok") == verdict


def test_a_traceback_while_running_is_a_warning_naming_its_line():
    text = dict((c[0], c[1]) for c in CASES)["traceback while running is a warning"]
    got = check_text(text)
    assert got.ok and got.warnings == [
        "log line 2: a traceback while the process kept running: BrokenPipeError: [Errno 32] "
        "Broken pipe"]
    assert got.losses == [2.0, 1.9] and got.formats == {"plain": 2}


def test_a_projects_loss_pattern_is_tried_first_and_the_formats_still_read_the_rest():
    text = "it 1 | L 3.0\n{'loss': 2.0, 'grad_norm': 1.0}\nit 2 | L inf\n"
    assert [v for _, v in parse_losses(text, r"\| L ([\w.]+)")][:2] == [3.0, 2.0]
    got = check_text(text, pattern=r"\| L ([\w.]+)")
    assert got.reason == "nan" and got.line == 3 and got.formats == {"loss_pattern": 2,
                                                                     "hf_dict": 1}


def test_a_plugin_rule_sees_each_step_with_its_gradient_norm():
    seen = []

    def rule(step, loss=None, grad_norm=None, lr=None):
        seen.append((step, loss, grad_norm))
        return ("grad_spike", f"grad_norm {grad_norm}") if grad_norm and grad_norm > 50 else None

    got = check_text("Step 1 | loss:2.0 grad_norm:1.5\nStep 2 | loss:1.9 grad_norm:80\n",
                     rules=[rule])
    assert got.reason == "grad_spike" and seen == [(1, 2.0, 1.5), (2, 1.9, 80.0)]
    assert math.isclose(got.last_loss, 1.9)
