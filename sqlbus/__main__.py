"""``python -m sqlbus``: the ``sqlbus`` command line."""

from .cli import main

main()
