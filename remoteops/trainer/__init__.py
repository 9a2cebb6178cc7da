"""The built-in trainer (HF Trainer + peft). Importing this package does not import torch."""
