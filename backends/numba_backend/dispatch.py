"""When a numba kernel uses the thread pool: kernels compiled twice, serial and parallel, the
version picked per call by size, and ``n_tasks`` for kernels that split rows themselves.

A parallel region wakes numba's thread pool, whose workers sleep between regions
(``OMP_WAIT_POLICY=PASSIVE``): that costs tens of microseconds, more than a row op on one
token takes. Decoding runs hundreds of such small ops per token, so they stay serial below
``PARALLEL_MIN_ELEMENTS`` (the same trade-off as ``packed.PARALLEL_MIN_MACS``). Both versions
run the same code (``prange`` is ``range`` when not parallel), so results are identical.
"""
from __future__ import annotations

import functools
import types

import numba
from numba import njit

PARALLEL_MIN_ELEMENTS = 1 << 15


def n_tasks(rows, elements, min_elements):
    """How many row ranges to split a kernel into: 1 (run it in the calling thread) below
    ``min_elements``, else one per numba thread (at most one per row)."""
    if elements < min_elements:
        return 1
    return max(1, min(rows, numba.get_num_threads()))


def parallel_when_large(**options):
    """Decorator: ``@parallel_when_large(cache=True, ...)`` on a kernel whose first argument
    is the array that measures its work."""

    def wrap(fn):
        parallel = njit(parallel=True, **options)(fn)
        # A distinct function object (and qualified name) keeps numba's on-disk caches apart.
        serial_fn = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                       fn.__defaults__, fn.__closure__)
        serial_fn.__qualname__ = fn.__qualname__ + "_serial"
        serial = njit(**options)(serial_fn)

        @functools.wraps(fn)
        def call(*args):
            return (parallel if args[0].size >= PARALLEL_MIN_ELEMENTS else serial)(*args)

        call.parallel, call.serial = parallel, serial
        return call

    return wrap
