"""`python -m scenebreak`: the command line, as the `scenebreak` script runs it."""

from .cli import main

main()
