from services.fast.app import main

main()
