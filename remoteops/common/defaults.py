"""Default settings of the trainer's config tables (``[train]``, ``[health]``, ``[eval]``),
the training presets and the stage kinds.

Pure data, no torch: the laptop side validates config files against it.
Per-stage overrides live in ``[stages.<name>]`` (``dataset``, ``eval_set``,
``preset``, a ``train`` sub-table, ``targets``).
"""

TRAIN_DEFAULTS = {
    "base_model": "outputs/demo-model",
    "preset": "standard",          # quick | standard | extended (see trainer/stageconf.py)
    "epochs": 2.0,
    "batch_size": 1,
    "grad_accum": 8,
    "lr": 1e-4,
    "lr_scheduler": "linear",      # any transformers lr_scheduler_type
    "warmup_steps": 0.0,           # < 1: share of all steps; >= 1: steps
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "max_seq_len": 512,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "quantization": "none",        # none | qlora (4-bit nf4 base, needs CUDA)
    "qlora_fallback": False,       # qlora without CUDA: train plain LoRA instead of failing
    "seed": 42,
    "max_bad_lines": 0,            # malformed data lines skipped before it is an error
    "eval_holdout": 0.1,           # share of the data held out when a stage has no eval_set
    "save_total_limit": 3,
    "logging_steps": 1,
    "inject_fault": "",            # drills: nan|explode|oom|cuda|kill@STEP, oom>N [:rankN]
}

HEALTH_DEFAULTS = {
    "loss_max": 1e4,               # a loss above this is divergence
    "explode_ratio": 10.0,         # ... and so is one this many times the running minimum
    "warmup_check_steps": 3,       # steps that must pass before <stage>.healthy
    "stagnation_steps": 0,         # optional: fail when the loss has not improved this long
    "stagnation_min_delta": 0.0,   # ... by more than this
    "heartbeat_seconds": 5.0,
    "stale_seconds": 600.0,        # log/heartbeat older than this: process presumed dead
    "window_seconds": 180.0,
    # a command stage's log: logged steps in a row with an inf gradient norm and a finite,
    # non-zero loss that pass (an fp16 loss scaler skips such steps; NaN always stops)
    "grad_overflow_steps": 3,       # the first minutes: a stage that passes them is healthy (0: off)
    # a command stage's output is read per trainer's line format (server/logformats.py); a
    # regular expression here (first group: the loss) is tried on each line before them
    "loss_pattern": "",
}

EVAL_DEFAULTS = {
    "max_new_tokens": 64,
    "coverage_target": 0.90,       # used when a stage names no targets of its own
    "format_target": 0.95,
}

# Training presets a stage may name (``preset = "quick"``), scaling the train defaults.
PRESETS: dict[str, dict[str, float]] = {
    "quick": {"epochs_scale": 0.5, "max_seq_len_cap": 256},
    "standard": {},
    "extended": {"epochs_scale": 2.0},
}

# What a stage is: the built-in precheck, the built-in trainer, any command, or collect.
KINDS = ("precheck", "train", "command", "collect")
