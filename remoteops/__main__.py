from remoteops.main import program

program.run()
