"""Numba CPU backend (Triangle vertex 2): kernels for the hot ops, reference for the rest."""
from __future__ import annotations

import os

import numpy as np

# Numba's OpenMP workers spin while they wait by default; on a busy 2-core machine every small
# parallel kernel then costs milliseconds. Passive waiting must be chosen before numba loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Compiled kernels go to the user cache directory (~/.cache/nanochat-ternary/numba, or
# $NANOCHAT_CACHE/numba, or $NUMBA_CACHE_DIR), not __pycache__ in the source tree; numba reads
# it when the kernel modules are decorated, so this runs before they are imported.
from ..threads import use_user_cache_dir  # noqa: E402

use_user_cache_dir()


def probe():
    """None when numba imports here, else why not."""
    try:
        import numba  # noqa: F401
    except Exception as exc:  # pragma: no cover - numba is a hard dependency
        return f"numba does not import: {exc}"
    return None


def make_backend():
    from .. import Backend
    from .ops import OPS

    return Backend("numba", np, OPS, np.float32, "Numba CPU kernels")
