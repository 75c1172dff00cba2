from services.slow.app import main

main()
