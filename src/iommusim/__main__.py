from iommusim.cli.app import main

main()
