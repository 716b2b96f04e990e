"""realign: DPO realignment with a measured quality gate after every stage.

The import package is ``realign`` (source folder ``lib/``). Heavy training
dependencies (torch, transformers, trl) are imported lazily by the modules
that need them, so data validation works without them.
"""

__version__ = "0.1.0"
