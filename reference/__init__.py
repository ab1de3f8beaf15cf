"""The NumPy reference: ground truth for every op (Triangle of Truth, vertex 1).

``OPS`` maps every op name to its reference implementation; backends override entries
by name and fall back to these for the rest. Each module keeps an op's forward and
backward side by side:

- ``ops``       arithmetic, matmul, shape ops, reductions, exp/log
- ``nn``        softmax, activations, RMSNorm, RoPE, attention, cross-entropy
- ``ternary``   quantizers, ternary_linear (STE), 2-bit packing, packed GEMV/GEMM
- ``mhc``       mHC residual streams (static and dynamic) and the ``.mhc`` file format
- ``moe``       top-k routing and the load-balancing loss
- ``deltanet``  Gated DeltaNet (recurrent and chunkwise)
- ``decode``    one decode step of a whole dense attention block (what backends fuse)
- ``optim``     AdamW, Lion, Muon, 8-bit Muon, GaLore 2, schedule, clipping
"""
from .autograd import Function, Tensor, array_module, gradcheck, no_grad
from . import ops, nn, ternary, mhc, moe, deltanet, decode, optim

OPS = {}
for _module in (ops, nn, ternary, mhc, moe, deltanet, decode, optim):
    _clash = set(OPS) & set(_module.OPS)
    assert not _clash, f"op names defined twice: {sorted(_clash)}"
    OPS.update(_module.OPS)

__all__ = ["Function", "Tensor", "array_module", "gradcheck", "no_grad", "OPS"]
