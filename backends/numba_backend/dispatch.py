"""When a numba kernel uses the thread pool: kernels compiled twice, serial and parallel, the
version picked per call by size, and ``n_tasks`` for kernels that split rows themselves.

A parallel region wakes numba's thread pool, whose workers sleep between regions
(``OMP_WAIT_POLICY=PASSIVE``): that costs tens of microseconds, more than a row op on one
token takes. Decoding runs hundreds of such small ops per token, so they stay serial below
``PARALLEL_MIN_ELEMENTS`` (the same trade-off as ``packed.PARALLEL_MIN_MACS``). Both versions
run the same code (``prange`` is ``range`` when not parallel), so results are identical.

Also here: ``cache_depends_on``, for a file whose cached kernels call other files' kernels
(numba's disk cache only checks the caller's own file).
"""
from __future__ import annotations

import functools
import hashlib
import os
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


# --- caches of kernels that call other files' kernels -------------------------------------

_DEPENDENCIES: dict[str, tuple[str, ...]] = {}


@functools.lru_cache(maxsize=None)
def _file_hash(path, mtime_ns):
    """sha256 of a file's bytes, read once per version (every kernel of a file asks)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _dependent_locator():
    """A numba cache locator (numba's user-directory one) whose source stamp covers the
    files registered with ``cache_depends_on`` besides the kernel's own file."""
    from numba.core import caching

    base = getattr(caching, "UserProvidedCacheLocator", None) or caching._UserProvidedCacheLocator
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl

    class DependentLocator(base):
        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.abspath(py_file) not in _DEPENDENCIES:
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            deps = _DEPENDENCIES[os.path.abspath(self._py_file)]
            return (super().get_source_stamp(),) + tuple(_file_hash(p, os.stat(p).st_mtime_ns) for p in deps)

    impl._locator_classes.insert(0, DependentLocator)


def cache_depends_on(path, *dependencies):
    """Declare that the cached kernels of the file ``path`` call numba kernels defined in the
    files ``dependencies`` (each is compiled into the caller). numba's cache checks only the
    caller's own file, so without this an edit to a callee would leave a stale kernel on
    disk. Call at the top of ``path``, before its kernels are decorated."""
    if not _DEPENDENCIES:
        _dependent_locator()
    _DEPENDENCIES[os.path.abspath(path)] = tuple(os.path.abspath(d) for d in dependencies)
