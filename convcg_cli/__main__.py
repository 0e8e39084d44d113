from convcg_cli.cli import main

main()
