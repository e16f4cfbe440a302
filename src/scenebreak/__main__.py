"""`python -m scenebreak`: the command line, as the `scenebreak` script runs it."""

from .cli.commands import main

main()
