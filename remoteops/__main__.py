from remoteops.laptop.main import program

program.run()
