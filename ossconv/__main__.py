from ossconv.cli import main

main()
