"""The server side: ``remoteops-agent`` (also ``python -m remoteops.agent``)."""
