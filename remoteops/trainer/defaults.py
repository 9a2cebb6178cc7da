"""Default settings of the trainer's config tables (``[train]``, ``[health]``, ``[eval]``).

Pure data, no torch: the laptop side validates config files against it.
Per-stage overrides live in ``[stages.<name>]`` (``dataset``, ``eval_set``,
``preset``, a ``train`` sub-table, ``targets``).
"""

TRAIN_DEFAULTS = {
    "base_model": "outputs/demo-model",
    "preset": "standard",
    "epochs": 2.0,
    "batch_size": 1,
    "grad_accum": 8,
    "lr": 1e-4,
    "max_seq_len": 512,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "quantization": "none",
    "qlora_fallback": False,
    "seed": 42,
    "max_bad_lines": 0,
}

HEALTH_DEFAULTS = {
    "loss_max": 1e4,
    "explode_ratio": 10.0,
    "warmup_check_steps": 3,
    "heartbeat_seconds": 5.0,
}

EVAL_DEFAULTS = {
    "max_new_tokens": 64,
}
