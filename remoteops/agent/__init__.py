"""``python -m remoteops.agent``: the wire name the laptop runs on the server; the agent is
``remoteops.server.agent`` (this package only keeps that command working)."""
