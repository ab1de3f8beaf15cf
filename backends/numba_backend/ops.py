"""The ops the numba backend overrides, by reference op name.

- ``linear``: ``ternary_linear`` for training (numba quantizers + exact grouped float32 sgemm).
- ``nn``: fused RMSNorm, SwiGLU / ReLU²-GLU, RoPE, softmax, cross-entropy (float32).
- ``quant``: bit-exact quantizers and 2-bit packing.
- ``packed``: packed-ternary GEMV/GEMM for inference.
- ``int8``: int8 x int8 products (``int8_linear``, the engine's int8 LM head).
- ``decode``: the fused attention step over a KV cache and the float LM head (``linear_rows``).
- ``layer``: one decode step of a whole dense attention block (``decode_layer``).
- ``mhc``: fused mHC stream mixing (``mhc_pre``, ``mhc_post``) and dynamic coefficients.
- ``optim``: fused optimizer steps (AdamW, Lion, Muon momentum, 8-bit Muon) and Newton-Schulz.

Every name here has a check in ``tests/test_triangle.py``; an op without one fails that suite.
"""
from .decode import OPS as _DECODE
from .int8 import OPS as _INT8
from .layer import OPS as _LAYER
from .linear import OPS as _LINEAR
from .mhc import OPS as _MHC
from .nn import OPS as _NN
from .optim import OPS as _OPTIM
from .packed import OPS as _PACKED
from .quant import OPS as _QUANT

OPS = {}
for _group in (_LINEAR, _NN, _QUANT, _PACKED, _INT8, _DECODE, _LAYER, _MHC, _OPTIM):
    _clash = set(OPS) & set(_group)
    assert not _clash, f"numba ops defined twice: {sorted(_clash)}"
    OPS.update(_group)
