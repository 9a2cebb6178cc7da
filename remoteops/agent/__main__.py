from remoteops.agent.cli import main

main()
