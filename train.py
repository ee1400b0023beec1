from taskprune.cli import main

main()
