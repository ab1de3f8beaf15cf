"""One thread policy for the CPU: numba's pool and the BLAS pool, sized together.

Training alternates numba kernels (numba's OpenMP pool) and float32 BLAS products (OpenBLAS's
own pthreads pool) many times per step. Both pools are sized to the core count by default, and
OpenBLAS's idle workers keep spinning (``sched_yield`` loops) for a while after each product.
On an idle machine that is harmless; with one other CPU-bound process on a 2-core machine, every
parallel region waits for a worker that the scheduler has parked behind the other process, and
the step slowed 25x (issue 17). The policy here:

- numba's pool gets ``n`` threads (never more than the cores this process may run on) and
  BLAS one: the numba backend splits its large float products over numba's ``n`` threads
  itself (``backends/numba_backend/gemm.py``: one single-thread BLAS call per block from a
  ``prange`` loop), so no second pool of spinning workers exists. Measured 2026-12-08 on the
  2-core machine, ``tiny`` peer shape: numba 2 + BLAS 2 threads 1,620-1,680 tokens/s, numba 1
  + BLAS 1 2,160-2,210, numba 2 + BLAS 1 2,400-2,420 (before the products were split). Where
  that split is not available (numpy on a BLAS other than OpenBLAS) BLAS gets ``n`` threads;
- ``n`` comes from ``NANOCHAT_THREADS`` when set (a number; ``auto`` or unset means adapt);
- adaptively, ``ThreadPolicy.adapt()`` (called once per training step, in the training thread)
  measures how many cores other processes kept busy since the last call (system CPU time minus
  this process's, from ``psutil``) and uses the cores left: 2 on an idle 2-core machine, 1 when
  another process holds a core. Leaving a core to the other process costs little; fighting it
  for that core costs everything (every barrier waits a scheduler time slice);

``numba.set_num_threads`` is per calling thread: ``apply``/``adapt`` must run in the thread
that runs the model (the trainer's main thread), not in a helper thread.

Also here: where numba keeps its compiled-kernel cache (``numba_cache_dir``: a user cache
directory, not the source tree) and whether this run will compile (``kernels_cached``), so the
trainer can say "compiling kernels, first run only" before the first step.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

ENV_THREADS = "NANOCHAT_THREADS"
ENV_CACHE = "NANOCHAT_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/nanochat-ternary"
COMPILE_NOTICE = "compiling kernels, first run only"


# --------------------------------------------------------------------------- environment

def cache_root() -> Path:
    """``$NANOCHAT_CACHE``, else ``~/.cache/nanochat-ternary`` (the data cache's root too)."""
    return Path(os.environ.get(ENV_CACHE) or DEFAULT_CACHE_DIR).expanduser()


def numba_cache_dir() -> Path:
    """Where numba's compiled kernels live: ``$NUMBA_CACHE_DIR`` when the user set one, else
    ``<cache root>/numba``."""
    explicit = os.environ.get("NUMBA_CACHE_DIR")
    return Path(explicit).expanduser() if explicit else cache_root() / "numba"


def use_user_cache_dir() -> Path:
    """Point numba's on-disk cache at ``numba_cache_dir()`` and return it.

    Must run before the ``cache=True`` kernels are decorated (numba reads the directory when a
    kernel module is imported); ``backends.numba_backend`` calls it first thing. When numba is
    already imported its config is updated as well.
    """
    path = numba_cache_dir()
    os.environ["NUMBA_CACHE_DIR"] = str(path)
    import sys

    numba = sys.modules.get("numba")
    if numba is not None:
        numba.config.CACHE_DIR = str(path)
    return path


def kernels_cached(module_prefix: str = "") -> bool:
    """True when the numba cache directory already holds compiled kernels (index files
    ``*.nbi``) whose names start with ``module_prefix``; False means the first step compiles."""
    root = numba_cache_dir()
    if not root.is_dir():
        return False
    for _dirpath, _dirs, files in os.walk(root):
        if any(f.endswith(".nbi") and f.startswith(module_prefix) for f in files):
            return True
    return False


# Cache files of the engine's fused block kernels (``numba_backend/layer.py``): present once
# an inference process has compiled them (a training run compiles other kernels).
INFERENCE_KERNELS = "layer."


def compile_notice(backend, write=print, module_prefix="") -> bool:
    """Say ``compiling kernels, first run only`` (via ``write``) when ``backend`` is the numba
    backend and its kernels (those whose cache files start with ``module_prefix``; the
    inference commands pass ``INFERENCE_KERNELS``) are not in the cache yet. Returns whether
    it said so."""
    if getattr(backend, "name", backend) != "numba" or kernels_cached(module_prefix):
        return False
    write(f"{COMPILE_NOTICE} (cached in {numba_cache_dir()})")
    return True


# --------------------------------------------------------------------------- thread counts

def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def requested_threads():
    """The count from ``NANOCHAT_THREADS`` (an int >= 1), or None for ``auto``/unset.

    Raises ValueError naming the variable for anything else."""
    raw = os.environ.get(ENV_THREADS, "").strip().lower()
    if raw in ("", "auto", "0"):
        return None
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_THREADS} must be a positive integer or 'auto', got {raw!r}") from None
    if n < 1:
        raise ValueError(f"{ENV_THREADS} must be a positive integer or 'auto', got {raw!r}")
    return n


class _CpuMeter:
    """Cores kept busy by other processes since the previous reading (psutil)."""

    MIN_INTERVAL = 0.05  # seconds; a reading costs ~30 us, a decode step can take 0.3 ms

    def __init__(self):
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self._last = self._read()

    def _read(self):
        t = self._psutil.cpu_times()
        busy = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
        own = self._proc.cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def others(self):
        """Average number of cores other processes used since the last reading (None if that
        was under ``MIN_INTERVAL`` ago: then nothing is read, so calling often costs little)."""
        if time.monotonic() - self._last[0] < self.MIN_INTERVAL:
            return None
        now = self._read()
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        self._last = now
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


def blas_threads(n):
    """BLAS's thread count under a policy of ``n``: one where the numba backend splits float
    products over its own threads, else ``n``."""
    try:
        from backends.numba_backend import gemm
    except Exception:  # numba missing or broken: BLAS does the threading
        return n
    return 1 if gemm.AVAILABLE else n


class ThreadPolicy:
    """Sizes numba's and the BLAS/OpenMP pools together; see the module docstring.

    ``ThreadPolicy(threads=None)``: a fixed count (or ``NANOCHAT_THREADS``), else adaptive.
    ``apply()`` sets the pools now; ``adapt()`` (cheap, once per step) re-measures the other
    processes' load and resizes when the cores left change. ``history`` records the changes
    as ``(time, threads, others' cores)``.
    """

    def __init__(self, threads=None, adaptive=None, max_threads=None):
        fixed = threads if threads is not None else requested_threads()
        self.cores = available_cores()
        self.max_threads = min(self.cores, max_threads or self.cores)
        self.fixed = None if fixed is None else max(1, min(int(fixed), self.cores))
        self.adaptive = (self.fixed is None) if adaptive is None else bool(adaptive)
        self.threads = self.fixed or self.max_threads
        self.history = []
        self._limiter = None
        self._meter = None
        if self.adaptive:
            try:
                self._meter = _CpuMeter()
            except Exception:  # psutil missing or /proc unreadable: stay fixed
                self.adaptive = False

    def apply(self, threads=None):
        """Set numba's pool (this thread) and other OpenMP pools to ``threads`` (default the
        current choice), BLAS to ``blas_threads(threads)``."""
        n = int(threads or self.threads)
        self.threads = n
        blas = blas_threads(n)
        try:
            import numba

            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        except Exception:  # numba missing or its pool not startable: BLAS still limited
            pass
        try:
            from threadpoolctl import threadpool_limits

            # The limiter object keeps the originals; limits apply to every loaded BLAS/OpenMP
            # library (numpy's and scipy's OpenBLAS, libgomp).
            self._limiter = threadpool_limits(limits={"blas": blas, "openmp": n})
        except Exception:
            self._limiter = None
        global _BLAS_ONE
        _BLAS_ONE = self._limiter is not None and blas == 1
        return n

    def choose(self, others):
        """The thread count for ``others`` cores busy elsewhere."""
        if self.fixed is not None:
            return self.fixed
        free = self.cores - int(others + 0.5)
        return max(1, min(self.max_threads, free))

    def adapt(self):
        """Re-measure and resize if needed; returns the thread count in force."""
        if not self.adaptive or self._meter is None:
            return self.threads
        others = self._meter.others()
        if others is None:
            return self.threads
        n = self.choose(others)
        if n != self.threads:
            self.history.append((time.time(), n, round(others, 2)))
            self.apply(n)
        return self.threads

    def describe(self):
        mode = "adaptive" if self.adaptive else "fixed"
        return {"threads": self.threads, "mode": mode, "cores": self.cores, "changes": len(self.history)}


_POLICY = None
_POLICY_ENV = None  # the NANOCHAT_THREADS value the policy was made with


def apply_thread_policy(threads=None):
    """Create (once) and apply the process-wide policy; returns its ``describe()`` dict.

    The trainer calls this before its first step, then ``adapt_threads()`` once per step."""
    global _POLICY, _POLICY_ENV
    env = os.environ.get(ENV_THREADS)
    if _POLICY is None or threads is not None or env != _POLICY_ENV:  # NANOCHAT_THREADS is read at each start
        _POLICY, _POLICY_ENV = ThreadPolicy(threads), env
    _POLICY.apply()
    return _POLICY.describe()


def adapt_threads():
    """Once per training step, in the training thread: resize the pools to the free cores.
    A no-op (returns None) before ``apply_thread_policy``."""
    if _POLICY is None:
        return None
    return _POLICY.adapt()


def policy():
    """The process-wide ``ThreadPolicy`` (None before ``apply_thread_policy``)."""
    return _POLICY


def start_training(backend, write=print):
    """The trainer's one call before its first step (and before the first evaluation, which
    compiles the forward kernels): apply the thread policy and say ``compiling kernels, first
    run only`` when the numba kernels are not cached yet; training also keeps freed memory in
    the heap (``backends.memory``). Returns the policy's ``describe()``."""
    from backends.memory import keep_freed_memory

    keep_freed_memory()
    described = apply_thread_policy()
    compile_notice(backend, write)
    return described


_BLAS_ONE = False  # BLAS held at one thread (by the training policy or inference_threads)
_INFERENCE_LIMITER = None


# libgomp's own default spin before a worker sleeps (when OMP_WAIT_POLICY is unset); numba's
# backend sets OMP_WAIT_POLICY=PASSIVE (no spin at all) for training's sake.
INFERENCE_SPINCOUNT = "300000"


_SPINNING = None  # libgomp reads GOMP_SPINCOUNT once, so the answer is kept once known


def spinning_workers():
    """True when numba's OpenMP workers spin a while after a parallel region before they sleep
    (``GOMP_SPINCOUNT`` > 0), so the next region starts without a wake-up."""
    global _SPINNING
    if _SPINNING is None:
        try:
            _SPINNING = int(os.environ.get("GOMP_SPINCOUNT", "0") or 0) > 0
        except ValueError:
            _SPINNING = True  # libgomp also accepts forms like "10k" and "infinite"
    return _SPINNING


def inference_spin():
    """Let numba's idle workers spin briefly between parallel regions (inference processes).

    A decode step runs about fifty short parallel products; with passive workers each one pays
    a futex wake-up (measured on the 2-core machine, 2026-12-03: 48 ``nano_125m`` GEMVs took
    5.6-6.3 ms on two threads against 2.4-3.9 ms on one; with spinning workers 1.8-2.3 ms).
    Sets ``GOMP_SPINCOUNT`` (libgomp's default, ``INFERENCE_SPINCOUNT``; a few milliseconds
    of spinning, then the workers sleep, so an idle server does not burn a core) unless the
    user set it. libgomp reads it when numba starts its pool, at the first parallel kernel:
    called after that (a process that trained first), it changes nothing and returns False."""
    if "GOMP_SPINCOUNT" in os.environ:
        return spinning_workers()  # the user's setting
    try:
        from numba.np.ufunc import parallel

        if parallel._is_initialized:
            return False
    except Exception:  # numba missing: nothing to configure
        return False
    global _SPINNING
    os.environ["GOMP_SPINCOUNT"] = INFERENCE_SPINCOUNT
    _SPINNING = True
    return True


def inference_threads():
    """Before every inference forward: size numba's pool to the free cores, as training does
    (the process-wide ``ThreadPolicy``: ``NANOCHAT_THREADS`` or adaptive; it re-reads the CPU
    load at most every ``_CpuMeter.MIN_INTERVAL``), and hold the BLAS pool at one thread.

    Adaptive sizing matters more here than in training: a decode step runs ~50 parallel
    regions, and with both workers on a 2-core machine that another process keeps one core of
    busy, each region waits for a scheduler time slice. Measured 2026-12-08 on the 2-core VM
    (``nano_125m`` shape, random weights, 2 threads, another process using ~1.5 cores): 335-385
    ms a decode step against 5-7 ms idle.

    The engine's BLAS calls are small (the LM head's one-row product, float64 attention over one
    query): a second BLAS thread gains nothing there and its spinning competes with numba's pool
    for the cores. Measured on the 2-core machine, 2026-12-03: the tiny decode step took 8-12 ms
    with OpenBLAS's default two threads and 2.2-3.0 ms with one, old and new engine alike; setting
    and restoring the count around every forward cost about 0.5 ms of that again, so the count is
    set once and left."""
    global _BLAS_ONE, _INFERENCE_LIMITER
    if _POLICY is None or os.environ.get(ENV_THREADS) != _POLICY_ENV:
        apply_thread_policy()
    else:
        _POLICY.adapt()
    if _BLAS_ONE:
        return
    try:
        from threadpoolctl import ThreadpoolController

        _INFERENCE_LIMITER = ThreadpoolController().limit(limits=1, user_api="blas")
    except Exception:  # threadpoolctl missing or no BLAS found: nothing to limit
        _INFERENCE_LIMITER = None
    _BLAS_ONE = True
