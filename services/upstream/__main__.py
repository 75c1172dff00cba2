from services.upstream.app import main

main()
