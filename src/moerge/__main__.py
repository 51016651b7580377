from moerge.cli import main

main()
