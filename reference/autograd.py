"""autograd-lite: a Tensor, a tape, and ops with an explicit forward and backward.

Every differentiable op is a ``Function`` subclass with two static methods working on
plain arrays (numpy or cupy, found through ``array_module``):

    forward(ctx, *inputs, **options) -> array | tuple of arrays
    backward(ctx, *grad_outputs)     -> one gradient (or None) per positional input

``Function.apply`` unwraps ``Tensor`` arguments, runs ``forward`` and, when gradients are
wanted, records a node on the tape. ``Tensor.backward`` walks the tape in reverse
topological order. Backends override an op by providing another ``Function`` subclass
under the same name (see ``backends``).
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

_state = threading.local()


def grad_enabled() -> bool:
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def no_grad():
    """Run ops without recording them on the tape."""
    previous = grad_enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = previous


def data_of(a):
    """The array behind a Tensor, or ``a`` itself."""
    return a.data if isinstance(a, Tensor) else a


def array_module(*arrays):
    """numpy, or cupy when any argument is a cupy array (cupy is imported only then)."""
    for a in arrays:
        data = data_of(a)
        if type(data).__module__.split(".")[0] == "cupy":
            import cupy

            return cupy
    return np


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape`` (undo numpy broadcasting)."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


class Context:
    """Per-call scratch space shared by ``forward`` and ``backward``."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad
        self.saved = ()

    def save(self, *arrays):
        self.saved = arrays


class _Node:
    __slots__ = ("function", "ctx", "parents", "out_meta")

    def __init__(self, function, ctx, parents, out_meta):
        self.function = function
        self.ctx = ctx
        self.parents = parents  # one Tensor or None per positional input
        self.out_meta = out_meta  # (shape, dtype) per output


class Function:
    """Base class of every differentiable op."""

    @staticmethod
    def forward(ctx, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs):
        arrays = [a.data if isinstance(a, Tensor) else a for a in args]
        needs = tuple(isinstance(a, Tensor) and a.requires_grad for a in args)
        track = grad_enabled() and any(needs)
        ctx = Context(needs)
        out = cls.forward(ctx, *arrays, **kwargs)
        outputs = out if isinstance(out, tuple) else (out,)
        if not track:
            wrapped = tuple(Tensor(o) for o in outputs)
        else:
            parents = tuple(a if isinstance(a, Tensor) and a.requires_grad else None for a in args)
            node = _Node(cls, ctx, parents, tuple((o.shape, o.dtype) for o in outputs))
            wrapped = tuple(Tensor(o, requires_grad=True, _node=(node, i)) for i, o in enumerate(outputs))
        return wrapped if isinstance(out, tuple) else wrapped[0]


class Tensor:
    """An array plus what reverse-mode differentiation needs."""

    __slots__ = ("data", "grad", "requires_grad", "_node", "retains_grad", "name")
    __array_priority__ = 1000  # make ndarray <op> Tensor call our reflected operators

    def __init__(self, data, requires_grad=False, name=None, _node=None):
        if isinstance(data, Tensor):
            data = data.data
        self.data = data if hasattr(data, "shape") and hasattr(data, "dtype") else array_module(data).asarray(data)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = _node
        self.retains_grad = False
        self.name = name

    # --- array-like properties -------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    xp = property(lambda self: array_module(self.data))

    def __len__(self):
        return self.data.shape[0]

    def __repr__(self):
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"

    def numpy(self):
        d = self.data
        return d.get() if hasattr(d, "get") else np.asarray(d)

    def item(self):
        return float(self.data)

    def detach(self):
        return Tensor(self.data)

    def retain_grad(self):
        """Keep ``.grad`` on this non-leaf tensor after ``backward`` (for tests and diagnostics)."""
        self.retains_grad = True
        return self

    @property
    def is_leaf(self):
        return self._node is None

    # --- reverse mode ----------------------------------------------------------------
    def backward(self, grad=None, on_leaf_ready=None):
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad`` (``grad`` defaults to ones).

        ``on_leaf_ready(leaf)``, when given, is called once for every leaf of the graph as soon
        as this pass has added all it will to that leaf's ``.grad`` (data-parallel training
        starts reducing gradients while the rest of the backward runs).
        """
        if not self.requires_grad:
            raise ValueError("backward() called on a tensor that does not require grad")
        xp = self.xp
        if grad is None:
            grad = xp.ones_like(self.data)
        grad = grad.data if isinstance(grad, Tensor) else grad
        if self._node is None:
            self._accumulate(grad)
            if on_leaf_ready is not None:
                on_leaf_ready(self)
            return
        order = _topological_order(self._node[0])
        pending = {id(self._node[0]): [None] * len(self._node[0].out_meta)}
        pending[id(self._node[0])][self._node[1]] = grad
        retained = _retained_tensors(order)
        ready_after = _leaves_by_last_use(order) if on_leaf_ready is not None else {}
        for position, node in enumerate(reversed(order)):
            outs = pending.pop(id(node), None)
            if outs is None:
                for leaf in ready_after.get(position, ()):
                    on_leaf_ready(leaf)
                continue
            for t in retained.get(id(node), ()):
                g = outs[t._node[1]]
                if g is not None:
                    t._accumulate(g)
            outs = [xp.zeros(s, dtype=d) if g is None else g for g, (s, d) in zip(outs, node.out_meta)]
            in_grads = node.function.backward(node.ctx, *outs)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            for parent, g in zip(node.parents, in_grads):
                if parent is None or g is None:
                    continue
                if g.shape != parent.shape:
                    g = unbroadcast(g, parent.shape)
                if parent._node is None:
                    parent._accumulate(g)
                else:
                    slot = pending.setdefault(id(parent._node[0]), [None] * len(parent._node[0].out_meta))
                    i = parent._node[1]
                    slot[i] = g if slot[i] is None else slot[i] + g
            for leaf in ready_after.get(position, ()):
                on_leaf_ready(leaf)

    def _accumulate(self, g):
        if g.dtype != self.data.dtype:
            g = g.astype(self.data.dtype)
        self.grad = g.copy() if self.grad is None else self.grad + g

    # --- operators (defined in reference.ops) ---------------------------------------
    def __add__(self, o):
        from . import ops
        return ops.add(self, o)

    def __radd__(self, o):
        from . import ops
        return ops.add(o, self)

    def __sub__(self, o):
        from . import ops
        return ops.sub(self, o)

    def __rsub__(self, o):
        from . import ops
        return ops.sub(o, self)

    def __mul__(self, o):
        from . import ops
        return ops.mul(self, o)

    def __rmul__(self, o):
        from . import ops
        return ops.mul(o, self)

    def __truediv__(self, o):
        from . import ops
        return ops.div(self, o)

    def __rtruediv__(self, o):
        from . import ops
        return ops.div(o, self)

    def __neg__(self):
        from . import ops
        return ops.neg(self)

    def __matmul__(self, o):
        from . import ops
        return ops.matmul(self, o)

    def __rmatmul__(self, o):
        from . import ops
        return ops.matmul(o, self)

    def __getitem__(self, index):
        from . import ops
        return ops.getitem(self, index)

    def reshape(self, *shape):
        from . import ops
        return ops.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def transpose(self, *axes):
        from . import ops
        return ops.transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else (axes or None))

    @property
    def T(self):
        return self.transpose()

    def sum(self, axis=None, keepdims=False):
        from . import ops
        return ops.sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        from . import ops
        return ops.mean(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims=False):
        from . import ops
        return ops.max(self, axis=axis, keepdims=keepdims)

    def exp(self):
        from . import ops
        return ops.exp(self)

    def log(self):
        from . import ops
        return ops.log(self)


def _topological_order(root):
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for p in node.parents:
            if p is not None and p._node is not None and id(p._node[0]) not in seen:
                stack.append((p._node[0], False))
    return order


def _leaves_by_last_use(order):
    """``{position in reversed(order): [leaves]}``: the node after which each leaf's gradient is
    complete (the last one, in backward order, that has the leaf as a parent)."""
    last = {}
    for position, node in enumerate(reversed(order)):
        for p in node.parents:
            if p is not None and p._node is None:
                last[id(p)] = (position, p)
    out = {}
    for position, leaf in last.values():
        out.setdefault(position, []).append(leaf)
    return out


def _retained_tensors(order):
    """Non-leaf tensors that asked to keep their gradient, grouped by producing node."""
    found = {}
    for node in order:
        for p in node.parents:
            if p is not None and p.retains_grad and p._node is not None:
                lst = found.setdefault(id(p._node[0]), [])
                if all(t is not p for t in lst):
                    lst.append(p)
    return found


def gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, seed=0, max_checks=64):
    """Compare ``fn``'s backward with central finite differences in float64.

    ``fn`` maps Tensors to a Tensor or a tuple of Tensors. The scalar checked is
    ``sum_i <out_i, R_i>`` with fixed random ``R_i``. At most ``max_checks`` entries per
    input are perturbed (chosen at random) to keep large inputs cheap. Raises
    ``AssertionError`` naming the input and entry on the first mismatch; returns True.
    """
    rng = np.random.default_rng(seed)
    arrays = [np.array(a, dtype=np.float64) for a in inputs]
    tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    outs = fn(*tensors)
    outs = outs if isinstance(outs, tuple) else (outs,)
    weights = [rng.standard_normal(o.shape) for o in outs]

    def scalar(arrs):
        with no_grad():
            res = fn(*[Tensor(a) for a in arrs])
        res = res if isinstance(res, tuple) else (res,)
        return sum(float(np.sum(np.asarray(r.data, dtype=np.float64) * w)) for r, w in zip(res, weights))

    total = None
    for o, w in zip(outs, weights):
        if not o.requires_grad:
            continue
        term = _weighted_sum(o, w)
        total = term if total is None else total + term
    if total is None:
        raise AssertionError("gradcheck: no output depends on the inputs")
    total.backward()
    for n, (a, t) in enumerate(zip(arrays, tensors)):
        analytic = t.grad if t.grad is not None else np.zeros_like(a)
        flat = np.arange(a.size)
        if a.size > max_checks:
            flat = rng.choice(a.size, size=max_checks, replace=False)
        for f in flat:
            idx = np.unravel_index(f, a.shape)
            plus, minus = [x.copy() for x in arrays], [x.copy() for x in arrays]
            plus[n][idx] += eps
            minus[n][idx] -= eps
            numeric = (scalar(plus) - scalar(minus)) / (2 * eps)
            got = float(analytic[idx])
            if not abs(got - numeric) <= atol + rtol * abs(numeric):
                raise AssertionError(
                    f"gradcheck: input {n} entry {tuple(int(i) for i in idx)}: "
                    f"backward gives {got:.10g}, finite differences give {numeric:.10g}"
                )
    return True


def _weighted_sum(t, w):
    from . import ops
    return ops.sum(ops.mul(t, Tensor(w.astype(t.dtype, copy=False) if hasattr(w, "astype") else w)))
