"""The ``realign`` command line (``realign = "realign.cli:main"``); see :mod:`realign.cli.entry`."""

from .entry import app, main

__all__ = ["app", "main"]
