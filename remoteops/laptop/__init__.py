"""The laptop side: the ``remoteops`` program and invoke tasks, targets (SSH, local),
bundle build, deploy, remote-train, collect, scaffold. Never imports the server, the
trainer, quant or torch (tests/test_architecture.py); see ARCHITECTURE.md."""
