from cpfcte.cli import main

main()
