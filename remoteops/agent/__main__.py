from remoteops.server.agent.cli import main

main()
