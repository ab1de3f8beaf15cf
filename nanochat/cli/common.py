"""The one argument/exit-code/error style every entry point shares.

Bad input is one ``prog: error: ...`` (argparse) or ``error: ...`` line on stderr and exit
status ``EXIT_BAD_INPUT``; backend choices come from the registry (``backends.BACKEND_NAMES``),
not from lists kept in each command.
"""
from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``prog: error: ...`` line and exit status 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def backend_choices():
    """``auto`` plus every registered backend name (whether or not it runs here: asking for
    one that cannot run gives its reason, not an argparse "invalid choice")."""
    import backends

    return ("auto",) + tuple(backends.registered())


def add_backend_argument(parser, default="auto", help="op backend (auto: cupy when a GPU works, else numba)"):
    parser.add_argument("--backend", default=default, choices=backend_choices(), help=help)


def fail(message) -> int:
    """Print one ``error:`` line on stderr; returns ``EXIT_BAD_INPUT`` for ``return fail(...)``."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
