from maskclip_engine.cli.main import main

main()
