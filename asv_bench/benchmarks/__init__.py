"""asv benchmarks for nanochat-ternary (run from ``asv_bench/``; see docs/benchmarks.md).

Every benchmark is parametrised over the op backends (``backends.get_backend(name)``), so
a backend picks up whatever kernels it overrides at the time of the run; a backend that
cannot run on this machine is skipped (``NotImplementedError`` in ``setup``). Float32
BLAS baselines of the same shapes sit next to the backends as extra parameter values.
"""
