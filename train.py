from taskprune.lightning.cli import main

main()
