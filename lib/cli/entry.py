"""The ``realign`` command line: a thin Typer + Rich adapter over the library.

This entry module only creates the Typer app and adds the commands of the command
modules to it, in the order ``realign --help`` lists them. Each command module
(:mod:`realign.cli.validate`, :mod:`realign.cli.pipeline`, ...) defines plain command
functions and a ``register(app)`` function; shared helpers live in
:mod:`realign.cli._common`, which imports nothing from this package. The imports are
static, so a missing command module is an ``ImportError``, never a missing command.
Heavy dependencies (torch, transformers, trl, the training backends) are imported inside
the command functions, so ``realign --help`` stays fast and works without them.

(The module is not named ``main`` so that ``realign.cli.main`` stays the function the
console script calls.)

Exit codes: 0 pass; 1 a gate failed; 2 bad input or usage; 3 incomplete (complete, but
a gate unmeasured); 4 complete with gate failures the config allowed.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from . import calibrate, ifd, init, pipeline, report, skill, tools, validate, verify
from . import eval as eval_
from ._common import err

__all__ = ["app", "main"]

app = typer.Typer(
    name="realign",
    help="DPO realignment with a measured quality gate after every stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (init, validate, verify, pipeline, eval_, ifd, calibrate, report, tools, skill):
    _module.register(app)
del _module


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    try:
        return app(args=argv, standalone_mode=True)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
