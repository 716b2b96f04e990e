"""``python -m realign.cli ...`` runs the ``realign`` command line."""

from .entry import main

main()
