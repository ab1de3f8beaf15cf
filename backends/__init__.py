"""The op registry: named backends that accelerate some ops and fall back to the reference.

    be = backends.get_backend("numba")
    y = be.ternary_linear(x, w, group_size=256)   # numba kernel if it overrides it,
    n = be.rmsnorm(x, w)                           # else the reference (written against xp)

A backend is a name, an array module ``xp`` (numpy or cupy), a default float dtype and a
dict of ops it overrides. Everything above this package (model, trainer, engine) calls
ops only through a ``Backend``; only the backend packages import numba or cupy.
"""
from __future__ import annotations

import importlib

import numpy as np

import reference


class Backend:
    """An op namespace: overridden ops first, then the reference implementations."""

    def __init__(self, name, xp, ops=None, dtype=np.float32, description=""):
        self.name = name
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.description = description or name
        self._ops = dict(ops or {})
        unknown = set(self._ops) - set(reference.OPS)
        if unknown:
            raise ValueError(f"backend {name!r} overrides ops the reference does not define: {sorted(unknown)}")

    @property
    def overridden(self) -> frozenset:
        """Names of the ops this backend implements itself."""
        return frozenset(self._ops)

    def op(self, name):
        if name in self._ops:
            return self._ops[name]
        if name in reference.OPS:
            return reference.OPS[name]
        raise AttributeError(f"no op named {name!r}; known ops: {', '.join(sorted(reference.OPS))}")

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self.op(name)

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return a.get() if hasattr(a, "get") else np.asarray(a)

    def synchronize(self):
        """Wait for queued device work (a no-op on the CPU)."""

    def __repr__(self):
        return f"<Backend {self.name}: {len(self._ops)} ops overridden>"


# name -> (module path, factory attribute, probe attribute). A probe returns None when the
# backend can run here, else a short reason.
_REGISTRY: dict[str, tuple] = {}
_CACHE: dict[str, Backend] = {}


def register(name, factory, probe=None):
    """Register a backend. ``factory``/``probe`` are callables or ``"module:attr"`` strings."""
    _REGISTRY[name] = (factory, probe)
    _CACHE.pop(name, None)


def _resolve(obj):
    if isinstance(obj, str):
        module, attr = obj.split(":")
        return getattr(importlib.import_module(module), attr)
    return obj


def unavailable_reason(name):
    """None when backend ``name`` can run here, else why not."""
    if name not in _REGISTRY:
        return "not a registered backend"
    _, probe = _REGISTRY[name]
    if probe is None:
        return None
    try:
        return _resolve(probe)()
    except Exception as exc:  # an import failure is a reason, not a crash
        return f"{type(exc).__name__}: {exc}"


def registered():
    """Names of every registered backend, in registration order."""
    return list(_REGISTRY)


def available():
    """Names of the registered backends that import and run on this machine."""
    return [n for n in _REGISTRY if unavailable_reason(n) is None]


def get_backend(name="auto"):
    """The backend called ``name``; ``auto`` picks cupy when a GPU works, else numba, else numpy."""
    if isinstance(name, Backend):
        return name
    if name == "auto":
        usable = available()
        name = next(n for n in ("cupy", "numba", "numpy") if n in usable)
    if name in _CACHE:
        return _CACHE[name]
    reason = unavailable_reason(name)
    if reason is not None:
        raise ValueError(
            f"backend {name!r} is not available ({reason}); available backends: {', '.join(available())}"
        )
    factory, _ = _REGISTRY[name]
    backend = _resolve(factory)()
    _CACHE[name] = backend
    return backend


def _numpy_backend():
    return Backend("numpy", np, {}, np.float32, "the NumPy reference in float32")


register("numpy", _numpy_backend)
register("numba", "backends.numba_backend:make_backend", "backends.numba_backend:probe")
register("cupy", "backends.cupy_backend:make_backend", "backends.cupy_backend:probe")

__all__ = ["Backend", "available", "get_backend", "register", "registered", "unavailable_reason"]
