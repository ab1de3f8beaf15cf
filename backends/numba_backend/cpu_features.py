"""Which packed-ternary kernel paths this CPU can run, and which one the backend uses.

Paths, fastest first:

- ``vnni``: ``vpdpbusd`` (u8 x s8 -> i32, 4-way dot product per lane) on 256-bit vectors. Needs
  AVX-512 VNNI with AVX-512 VL, or AVX-VNNI (the VEX form LLVM emits for the same intrinsic).
- ``avx2``: ``vpmaddubsw`` (u8 x s8 -> saturating i16 pairs) then ``vpmaddwd`` with ones.
- ``plain``: ordinary ``@njit`` loops that LLVM auto-vectorizes; runs everywhere.
- ``vnni_emulated``: the ``vnni`` kernel with each ``vpdpbusd`` replaced by the exact AVX2
  sequence. Never chosen by default; it lets a machine without VNNI check everything in the
  ``vnni`` kernel except the instruction itself.

The features are the ones Numba compiles for, not ``/proc/cpuinfo``: LLVM's view of the host
(``llvmlite.binding.get_host_cpu_features``), or only the ``+feature`` entries of
``NUMBA_CPU_FEATURES`` when that is set (``NUMBA_CPU_NAME=generic`` sets it to nothing, which
leaves the plain path). Code that uses an instruction the compile target lacks does not compile.

``NANOCHAT_NUMBA_KERNEL=vnni|avx2|plain`` forces a path at import (it must be runnable here).
"""
from __future__ import annotations

import functools
import os

KERNEL_ENV = "NANOCHAT_NUMBA_KERNEL"
PATHS = ("vnni", "avx2", "plain", "vnni_emulated")


@functools.lru_cache(maxsize=1)
def _llvm_host_features() -> frozenset:
    """LLVM's view of this CPU, asked once (the query costs about 0.25 ms, and training asks
    for every packed product)."""
    import llvmlite.binding as llvm

    return frozenset(name for name, on in llvm.get_host_cpu_features().items() if on)


def host_features() -> frozenset:
    """Names of the CPU features Numba compiles for (empty when unknown)."""
    try:
        from numba.core import config

        if config.CPU_FEATURES is not None:
            return frozenset(f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+"))
        return _llvm_host_features()
    except Exception:  # no feature query on this platform: only the plain path is safe
        return frozenset()


def unavailable_reason(path: str, features=None) -> str | None:
    """None when kernel ``path`` runs on this CPU, else a one-line reason."""
    if path not in PATHS:
        raise ValueError(f"unknown packed kernel path {path!r}; expected one of {', '.join(PATHS)}")
    feats = host_features() if features is None else frozenset(features)
    if path == "plain":
        return None
    if path in ("avx2", "vnni_emulated"):
        return None if "avx2" in feats else "this CPU has no AVX2"
    has_vnni = ("avx512vnni" in feats and "avx512vl" in feats) or "avxvnni" in feats
    return None if has_vnni else "this CPU has neither AVX-512 VNNI with AVX-512 VL nor AVX-VNNI"


def runnable_paths(features=None) -> tuple:
    """The kernel paths this CPU can run, fastest first (``vnni_emulated`` last)."""
    return tuple(p for p in PATHS if unavailable_reason(p, features) is None)


def default_path(features=None) -> str:
    """The path the backend uses: ``NANOCHAT_NUMBA_KERNEL`` if set, else the fastest runnable."""
    forced = os.environ.get(KERNEL_ENV, "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise ValueError(f"{KERNEL_ENV}={forced!r} is not a kernel path; expected one of {', '.join(PATHS)}")
        reason = unavailable_reason(forced, features)
        if reason is not None:
            raise ValueError(f"{KERNEL_ENV}={forced!r} cannot run here: {reason}")
        return forced
    return next(p for p in ("vnni", "avx2", "plain") if unavailable_reason(p, features) is None)
