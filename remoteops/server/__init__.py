"""The server side: the agent CLI (``remoteops-agent``, ``python -m remoteops.agent``),
apply with backups, the detached pipeline runner, post-processing and reports. Never
imports the laptop (tests/test_architecture.py); see ARCHITECTURE.md."""
