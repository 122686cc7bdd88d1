from intercept.cli import main

main()
