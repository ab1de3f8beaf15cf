"""Shared harness of the fuzz suite (tests/test_fuzz_*.py): every reader of outside data, fed
generated input, must give a valid result or one clean sentence, within a memory and time budget.

``guarded(target, fn, allowed)`` runs ``fn()`` with ``tracemalloc`` tracing (numpy and Python
allocations; the budget is ``MEMORY_BUDGET``) and a SIGALRM timeout (``TIME_BUDGET`` seconds),
and returns ``("ok", result)`` or ``("error", message)``. Anything else fails the test: an
exception outside ``allowed`` (a traceback for the user), a message that is empty or spans
several lines, a peak allocation over the budget, or a hang. ``COUNTS`` tallies the generated
cases per target (printed by ``pytest -s`` at the end of each fuzz module).
"""
from __future__ import annotations

import os
import signal
import tracemalloc
from collections import Counter

MEMORY_BUDGET = 256 << 20
TIME_BUDGET = 20
COUNTS: Counter = Counter()
OUTCOMES: Counter = Counter()


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


TALLY = os.environ.get("FUZZ_TALLY") == "1"  # count failures by kind instead of failing (before/after tables)


def guarded(target, fn, allowed=(ValueError,), memory=MEMORY_BUDGET, seconds=TIME_BUDGET):
    if TALLY:
        try:
            return _guarded(target, fn, allowed, memory, seconds)
        except AssertionError as exc:
            text = str(exc)
            kind = "hang" if "a hang" in text else "over budget" if "peak allocation" in text else "multi-line"
            OUTCOMES[(target, kind)] += 1
            return ("failed", text)
        except Exception as exc:  # noqa: BLE001 - a traceback the user would see
            OUTCOMES[(target, "traceback")] += 1
            return ("failed", type(exc).__name__)
    return _guarded(target, fn, allowed, memory, seconds)


def _guarded(target, fn, allowed, memory, seconds):
    COUNTS[target] += 1
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    tracemalloc.start()
    try:
        try:
            result = fn()
            outcome = ("ok", result)
        except Hang:
            raise AssertionError(f"{target}: no answer within {seconds} s (a hang)") from None
        except allowed as exc:
            message = str(exc).strip()
            assert message, f"{target}: {type(exc).__name__} with an empty message"
            assert "\n" not in message, f"{target}: a multi-line message: {message!r}"
            assert "Traceback" not in message, message
            outcome = ("error", message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert peak <= memory, f"{target}: peak allocation {peak:,} bytes, over the budget of {memory:,}"
    OUTCOMES[(target, outcome[0])] += 1
    return outcome


def report():
    kinds = ("ok", "error", "traceback", "over budget", "hang", "multi-line")
    lines = [f"{t}: {COUNTS[t]} cases; " + ", ".join(f"{k} {OUTCOMES[(t, k)]}" for k in kinds if OUTCOMES[(t, k)])
             for t in sorted(COUNTS)]
    return "\n".join(lines)


def mutate(data: bytes, draw, st, region=None) -> bytes:
    """A hypothesis-drawn damage of ``data``: byte flips (mostly in ``region``), a cut, or an insertion."""
    buf = bytearray(data)
    hi = len(buf) if region is None else min(len(buf), region)
    kind = draw(st.sampled_from(["flip", "flip", "flip", "cut", "insert", "overwrite"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, max(0, hi - 1)))
            buf[pos] = draw(st.integers(0, 255))
    elif kind == "cut":
        del buf[draw(st.integers(0, len(buf))):]
    elif kind == "insert":
        pos = draw(st.integers(0, hi))
        buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    else:  # overwrite a little-endian u32/u64 with an extreme value
        pos = draw(st.integers(0, max(0, hi - 8)))
        width = draw(st.sampled_from([4, 8]))
        value = draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**62, 2**64 - 1]))
        buf[pos:pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(buf)
