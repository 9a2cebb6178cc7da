from remoteops.laptop.entry import main

main()
