"""Keep freed memory in the process heap during training (glibc ``mallopt``).

A training step allocates and frees the same large arrays every step (activations, their int8
and float32 copies, gradients, attention blocks, Newton-Schulz temporaries: several GB at the
``nano_125m`` shape). glibc serves allocations above its mmap threshold (at most 32 MB) with
fresh ``mmap`` pages and returns them at ``free``, so every step touches gigabytes of new pages
again, and a first touch is slow on a VM: a 100 MB buffer filled at 0.6-9 GB/s when fresh
against ~25 GB/s when reused (2-core AMD EPYC VM, 2026-12-08). ``keep_freed_memory`` makes glibc
take every allocation from the heap (``M_MMAP_MAX = 0``) and not trim the heap's top back to the
OS (``M_TRIM_THRESHOLD``), so a step reuses the previous step's pages; peak RSS is the same (the
pattern repeats each step), but the memory stays with the process until it exits. Measured on
that VM (``benchmarks/peer/project_step.py --shape nano_125m --batch 2``, 2026-12-08): 26.3 s a
step (best 24.6) -> 24.9 s (best 22.3), peak RSS 9.58 vs 9.67 GB.

``NANOCHAT_KEEP_HEAP=0`` leaves glibc's defaults. A no-op where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "NANOCHAT_KEEP_HEAP"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEPT = None


def keep_freed_memory():
    """Apply the heap policy once per process; True when glibc accepted it."""
    global _KEPT
    if _KEPT is not None:
        return _KEPT
    _KEPT = False
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to configure
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # 1 GiB: larger than anything a step frees at the top of the heap at once, within an int
    _KEPT = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _KEPT
