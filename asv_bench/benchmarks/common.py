"""Shared pieces of the benchmarks: which implementations to run, and a small timer.

An *implementation* is either an op backend (``numpy``, ``numba``, ``cupy``, ...) or a
float32 BLAS baseline of the same shapes (``float32-blas`` on the CPU through NumPy,
``float32-cublas`` through CuPy). Parameter lists are fixed names, so results from a
machine without a GPU and one with a GPU line up in ``asv compare``; whatever cannot run
here raises ``NotImplementedError`` in ``setup`` and asv records it as skipped.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

import backends

KNOWN_BACKENDS = ("numpy", "numba", "cupy")
# A baseline name -> the backend whose array module (and synchronisation) it runs on.
BASELINES = {"float32-blas": "numpy", "float32-cublas": "cupy"}


def backend_names():
    """The known backends plus any other registered backend that runs here."""
    return list(dict.fromkeys(KNOWN_BACKENDS + tuple(backends.available())))


def implementation_names():
    """Backends first, then the float32 baselines."""
    return backend_names() + list(BASELINES)


def require_backend(name):
    """The backend ``name``, or ``NotImplementedError`` (asv: skipped) when it cannot run here."""
    reason = backends.unavailable_reason(name)
    if reason is not None:
        raise NotImplementedError(f"backend {name!r} is not available here: {reason}")
    return backends.get_backend(name)


def require_implementation(name):
    """``SimpleNamespace(name, baseline, be, xp, sync)`` for a backend or baseline name."""
    baseline = name in BASELINES
    be = require_backend(BASELINES.get(name, name))
    return SimpleNamespace(name=name, baseline=baseline, be=be, xp=be.xp, sync=_synchronizer(be))


def _synchronizer(be):
    """Waits for the backend's queued work. GPU kernels run asynchronously, so a device
    backend's timings also wait for the device itself (whatever ``be.synchronize`` does)."""
    cuda = getattr(be.xp, "cuda", None)
    if cuda is None:
        return be.synchronize

    def sync():
        be.synchronize()
        cuda.Device().synchronize()

    return sync


def best_seconds(fn, sync, min_runs=3, min_time=0.3, max_runs=50):
    """Fastest of repeated ``fn()`` calls (each followed by ``sync()``): at least ``min_runs``
    calls, more until ``min_time`` seconds have passed. The fastest call is the one least
    disturbed by other work on the machine. The caller warms ``fn`` up first (JIT, caches)."""
    best = float("inf")
    spent = 0.0
    for run in range(1, max_runs + 1):
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        if run >= min_runs and spent >= min_time:
            break
    return best


def shape_of(label):
    """``"4096x11008"`` -> ``(4096, 11008)``."""
    rows, cols = label.split("x")
    return int(rows), int(cols)


def random_ternary(rng, rows, cols, group_size):
    """Packed ternary weights ``(uint8 [rows, cols/4], float32 scales [rows, cols/G])``.

    Trits are uniform over {-1, 0, +1} (a third zeros, about what absmean quantization of
    Gaussian weights gives); scales are float16-representable as the SPEC requires.
    """
    q = rng.integers(-1, 2, size=(rows, cols), dtype=np.int8)
    scales = rng.uniform(0.01, 0.05, size=(rows, cols // group_size)).astype(np.float16).astype(np.float32)
    return backends.get_backend("numpy").pack_ternary(q), scales


def random_int8_acts(rng, shape):
    """int8 activations in [-127, 127] as ``quantize_acts`` produces them."""
    return rng.integers(-127, 128, size=shape, dtype=np.int8)
