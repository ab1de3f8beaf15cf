"""The one argument/exit-code/error style every entry point shares.

Bad input is one ``prog: error: ...`` (argparse) or ``error: ...`` line on stderr and exit
status ``EXIT_BAD_INPUT``; backend choices come from the registry (``backends.BACKEND_NAMES``),
not from lists kept in each command.
"""
from __future__ import annotations

import argparse
import os
import stat
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
    print(f"error: {one_line(message)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def one_line(message) -> str:
    """``message`` as one printable line: control characters (from user input) shown escaped."""
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in str(message).strip())


def say_if_compiling(engine) -> None:
    """On stderr, ``compiling kernels, first run only`` when the engine's fused kernels are not
    in numba's cache yet (its first forward then spends tens of seconds compiling)."""
    from backends.threads import INFERENCE_KERNELS, compile_notice

    compile_notice(engine.be, lambda line: print(line, file=sys.stderr, flush=True), INFERENCE_KERNELS)


def check_model_path(path) -> None:
    """ValueError (one sentence) unless ``path`` is a regular file or a directory, said precisely:
    missing, a device such as /dev/null, a FIFO, unreadable. Nothing is opened (a FIFO cannot block)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"model path {path} does not exist (give a .gguf file or a checkpoint directory).") from None
    except OSError as exc:
        raise ValueError(f"model path {path} cannot be examined ({exc.strerror or exc}).") from None
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
        else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
    raise ValueError(f"model path {path} is {kind}, not a .gguf file or a checkpoint directory.")


def check_text(text, what) -> str:
    """``text`` when it is valid Unicode; a ValueError naming ``what`` when it came from bytes that are
    not UTF-8 (Python keeps undecodable argv bytes as lone surrogates, which no tokenizer accepts)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        byte = f"byte {ord(bad) - 0xDC00:#04x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"code point U+{ord(bad):04X}"
        raise ValueError(f"{what} is not valid UTF-8 text ({byte} at character {exc.start}).") from None
    return text
