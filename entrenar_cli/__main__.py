from entrenar_cli.cli import main

main()
