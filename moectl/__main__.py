from moectl.cli import main

main()
