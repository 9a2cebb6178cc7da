import sys

from remoteops.server.stream_entry import run, wire_args

root = wire_args(sys.argv[1:])
if root is not None:  # the laptop's deploy request: no click to start (server/stream_entry)
    sys.exit(run(root))
if sys.argv[1:] == ["resident", "--json"]:  # the laptop's kept connection (server/resident)
    from remoteops.server.resident import main as resident

    sys.exit(resident(sys.argv[2:]))

from remoteops.server.agent.cli import main  # noqa: E402

main()
