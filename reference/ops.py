"""Basic differentiable ops: arithmetic, matmul, shape ops, reductions, exp/log.

Each op is a ``Function`` with its forward and backward side by side; the lower-case
name below it is the public entry point (``add(a, b)`` etc.).
"""
from __future__ import annotations

import builtins

from .autograd import Function, Tensor, array_module


def _check_same_dtype(op, *arrays):
    dtypes = {a.dtype for a in arrays if hasattr(a, "dtype") and a.dtype.kind == "f"}
    if len(dtypes) > 1:
        raise ValueError(f"{op}: operands have different float dtypes {sorted(str(d) for d in dtypes)}")


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save(getattr(a, "shape", ()), getattr(b, "shape", ()))
        return a + b

    @staticmethod
    def backward(ctx, g):
        return g, g


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        return a - b

    @staticmethod
    def backward(ctx, g):
        return g, -g


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        return (g * b if ctx.needs_input_grad[0] else None), (g * a if ctx.needs_input_grad[1] else None)


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save(a, b)
        return a / b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        ga = g / b if ctx.needs_input_grad[0] else None
        gb = -g * a / (b * b) if ctx.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, g):
        return (-g,)


class MatMul(Function):
    """``a @ b`` for 2-D or batched operands (batch dims broadcast)."""

    @staticmethod
    def forward(ctx, a, b):
        k_b = b.shape[0] if b.ndim == 1 else (b.shape[-2] if b.ndim >= 2 else None)
        if a.ndim < 1 or k_b is None or a.shape[-1] != k_b:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align")
        _check_same_dtype("matmul", a, b)
        ctx.save(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        xp = array_module(a)
        ga = gb = None
        if b.ndim == 1:  # matrix-vector product
            if ctx.needs_input_grad[0]:
                ga = g[..., None] * b
            if ctx.needs_input_grad[1]:
                gb = (a * g[..., None]).reshape(-1, b.shape[0]).sum(axis=0)
            return ga, gb
        if ctx.needs_input_grad[0]:
            ga = g @ xp.swapaxes(b, -1, -2)
        if ctx.needs_input_grad[1]:
            if a.ndim == 1:
                gb = xp.multiply.outer(a, g)
            else:
                gb = xp.swapaxes(a, -1, -2) @ g
        return ga, gb


class Reshape(Function):
    @staticmethod
    def forward(ctx, a, shape):
        ctx.save(a.shape)
        return a.reshape(shape)

    @staticmethod
    def backward(ctx, g):
        (shape,) = ctx.saved
        return g.reshape(shape), None


class Transpose(Function):
    @staticmethod
    def forward(ctx, a, axes=None):
        axes = tuple(reversed(range(a.ndim))) if axes is None else tuple(axes)
        ctx.save(axes)
        return a.transpose(axes)

    @staticmethod
    def backward(ctx, g):
        (axes,) = ctx.saved
        inverse = [0] * len(axes)
        for i, ax in enumerate(axes):
            inverse[ax] = i
        return (g.transpose(inverse),)


class GetItem(Function):
    """Basic and advanced indexing; backward scatters with ``add.at`` (repeats add up)."""

    @staticmethod
    def forward(ctx, a, index):
        ctx.save(a.shape, a.dtype, index)
        return a[index]

    @staticmethod
    def backward(ctx, g):
        shape, dtype, index = ctx.saved
        xp = array_module(g)
        out = xp.zeros(shape, dtype=dtype)
        if xp.__name__ == "numpy":
            xp.add.at(out, index, g)
        else:  # cupyx scatter_add handles repeated indices
            import cupyx

            cupyx.scatter_add(out, index, g)
        return out, None


class Concat(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        xp = array_module(*arrays)
        ctx.save(axis, [a.shape[axis] for a in arrays])
        return xp.concatenate(arrays, axis=axis)

    @staticmethod
    def backward(ctx, g):
        axis, sizes = ctx.saved
        xp = array_module(g)
        bounds = [int(s) for s in xp.cumsum(xp.asarray(sizes))[:-1].tolist()] if len(sizes) > 1 else []
        return tuple(xp.split(g, bounds, axis=axis))


class Split(Function):
    """Split into pieces of the given sizes along ``axis`` (a multi-output op)."""

    @staticmethod
    def forward(ctx, a, sizes, axis=0):
        if builtins.sum(sizes) != a.shape[axis]:
            raise ValueError(f"split: sizes {list(sizes)} do not add up to dimension {a.shape[axis]} of shape {a.shape}")
        xp = array_module(a)
        ctx.save(axis)
        bounds, acc = [], 0
        for s in sizes[:-1]:
            acc += s
            bounds.append(acc)
        return tuple(xp.split(a, bounds, axis=axis))

    @staticmethod
    def backward(ctx, *gs):
        (axis,) = ctx.saved
        xp = array_module(gs[0])
        return xp.concatenate(gs, axis=axis), None


class Gather(Function):
    """Embedding lookup: ``table[ids]`` with a scatter-add backward into the table."""

    @staticmethod
    def forward(ctx, table, ids):
        if ids.dtype.kind not in "iu":
            raise ValueError(f"gather: ids must be integers, got dtype {ids.dtype}")
        ctx.save(table.shape, table.dtype, ids)
        return table[ids]

    @staticmethod
    def backward(ctx, g):
        shape, dtype, ids = ctx.saved
        xp = array_module(g)
        out = xp.zeros(shape, dtype=dtype)
        flat_ids = ids.reshape(-1)
        flat_g = g.reshape(-1, shape[-1])
        if xp.__name__ == "numpy":
            xp.add.at(out, flat_ids, flat_g)
        else:
            import cupyx

            cupyx.scatter_add(out, flat_ids, flat_g)
        return out, None


def _expand_reduced(g, shape, axis, keepdims):
    if axis is None:
        return g.reshape((1,) * len(shape))
    if keepdims:
        return g
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    axes = tuple(a % len(shape) for a in axes)
    new_shape = [1 if i in axes else n for i, n in enumerate(shape)]
    return g.reshape(new_shape)


class Sum(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        ctx.save(a.shape, axis, keepdims)
        return a.sum(axis=axis, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        shape, axis, keepdims = ctx.saved
        xp = array_module(g)
        return (xp.broadcast_to(_expand_reduced(g, shape, axis, keepdims), shape).copy(),)


class Mean(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        out = a.mean(axis=axis, keepdims=keepdims)
        ctx.save(a.shape, axis, keepdims, a.size // builtins.max(out.size, 1))
        return out

    @staticmethod
    def backward(ctx, g):
        shape, axis, keepdims, count = ctx.saved
        xp = array_module(g)
        return (xp.broadcast_to(_expand_reduced(g, shape, axis, keepdims) / count, shape).copy(),)


class Max(Function):
    """Max reduction; ties share the gradient equally."""

    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        out = a.max(axis=axis, keepdims=True)
        mask = (a == out).astype(a.dtype)
        mask /= mask.sum(axis=axis, keepdims=True)
        ctx.save(a.shape, axis, keepdims, mask)
        return out if keepdims else (out.reshape(()) if axis is None else out.squeeze(axis))

    @staticmethod
    def backward(ctx, g):
        shape, axis, keepdims, mask = ctx.saved
        return (_expand_reduced(g, shape, axis, keepdims) * mask,)


class Exp(Function):
    @staticmethod
    def forward(ctx, a):
        xp = array_module(a)
        out = xp.exp(a)
        ctx.save(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved
        return (g * out,)


class Log(Function):
    @staticmethod
    def forward(ctx, a):
        xp = array_module(a)
        ctx.save(a)
        return xp.log(a)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved
        return (g / a,)


add = Add.apply
sub = Sub.apply
mul = Mul.apply
div = Div.apply
neg = Neg.apply
matmul = MatMul.apply
exp = Exp.apply
log = Log.apply
gather = Gather.apply


def reshape(a, shape):
    return Reshape.apply(a, tuple(shape))


def transpose(a, axes=None):
    return Transpose.apply(a, axes=axes)


def getitem(a, index):
    return GetItem.apply(a, index)


def concat(tensors, axis=0):
    return Concat.apply(*tensors, axis=axis)


def split(a, sizes, axis=0):
    return Split.apply(a, tuple(int(s) for s in sizes), axis=axis)


def sum(a, axis=None, keepdims=False):  # noqa: A001 - mirrors numpy
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def mean(a, axis=None, keepdims=False):
    return Mean.apply(a, axis=axis, keepdims=keepdims)


def max(a, axis=None, keepdims=False):  # noqa: A001 - mirrors numpy
    return Max.apply(a, axis=axis, keepdims=keepdims)


def check_linear_rows(x, w):
    if getattr(x, "ndim", 0) != 2 or getattr(w, "ndim", 0) != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear_rows: x must be [N, K] and w [M, K]; got x {getattr(x, 'shape', None)}, "
                         f"w {getattr(w, 'shape', None)}")
    _check_same_dtype("linear_rows", x, w)


def linear_rows(x, w):
    """``x [N, K] @ w [M, K].T -> [N, M]`` on plain arrays (inference: the float LM head);
    no gradient. Backends may run it as one pass per weight row."""
    x, w = (a.data if isinstance(a, Tensor) else a for a in (x, w))
    check_linear_rows(x, w)
    return x @ w.T


OPS = {
    "linear_rows": linear_rows,
    "add": add, "sub": sub, "mul": mul, "div": div, "neg": neg, "matmul": matmul,
    "reshape": reshape, "transpose": transpose, "getitem": getitem, "concat": concat,
    "split": split, "gather": gather, "sum": sum, "mean": mean, "max": max, "exp": exp, "log": log,
}
