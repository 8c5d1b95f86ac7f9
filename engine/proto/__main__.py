from engine.proto import main

main()
