"""``python -m lrsurgery``: the same as the ``lrsurgery`` command."""

from lrsurgery.cli import main

main()
