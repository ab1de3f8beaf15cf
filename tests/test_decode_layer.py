"""The numba backend's fused ``decode_layer``: bit-identical to its own op chain, taken by the
engine's decode steps, and its on-disk kernel cache follows the files it calls into."""
from __future__ import annotations

import numpy as np
import pytest

import reference
from backends import get_backend
from backends.numba_backend import dispatch, layer as fused
from reference.decode import compose
from tests.test_triangle import _decode_layers

nb = get_backend("numba")


@pytest.mark.parametrize("shape", [(128, 4, 2, 32, 256, 64, True, "swiglu"), (96, 3, 1, 32, 192, 32, False, "relu2_glu"),
                                   (1024, 8, 4, 128, 4096, 256, True, "swiglu")])
def test_fused_equals_the_op_chain_bit_for_bit(shape):
    rng = np.random.default_rng(3)
    dim, heads, kv_heads, hd = shape[:4]
    layer, _ = _decode_layers(nb, rng, *shape)
    assert fused.supports(layer)
    for t, start in ((1, 0), (1, 7), (1, 30), (3, 9), (70, 40)):
        x = rng.standard_normal((t, dim)).astype(np.float32)
        cos, sin = reference.OPS["rope_tables"](np.arange(start, start + t), hd, 10000.0, np.float32)
        kc = rng.standard_normal((1, 110, kv_heads, hd)).astype(np.float32)
        vc = rng.standard_normal((1, 110, kv_heads, hd)).astype(np.float32)
        k1, v1, k2, v2 = kc.copy(), vc.copy(), kc.copy(), vc.copy()
        got = nb.decode_layer(x, layer, k1, v1, start, cos, sin)
        want = compose(nb.op, x, layer, k2, v2, start, cos, sin)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(v1, v2)


def test_engine_decode_runs_fused_blocks():
    from nanochat.config import load_config
    from nanochat.infer.engine import Engine, random_model

    cfg = load_config("tiny")
    engine = Engine(random_model(cfg), "numba", max_len=64)
    seq = engine.new_sequence()
    engine.prefill(seq, [1, 2, 3])
    engine.decode([seq], [4])
    layers = engine.linear._layers
    assert len(layers) == cfg.model.n_layers and all(fused.supports(v) for v in layers.values())


def test_cache_stamp_follows_dependencies(tmp_path, monkeypatch):
    main, dep = tmp_path / "main.py", tmp_path / "dep.py"
    main.write_text("def f():\n    pass\n")
    dep.write_text("x = 1\n")
    monkeypatch.setattr(dispatch, "_DEPENDENCIES", dict(dispatch._DEPENDENCIES))
    dispatch.cache_depends_on(str(main), str(dep))
    from numba.core import caching

    locator_cls = caching.CompileResultCacheImpl._locator_classes[0]
    namespace = {}
    exec(compile(main.read_text(), str(main), "exec"), namespace)
    before = locator_cls.from_function(namespace["f"], str(main)).get_source_stamp()
    dep.write_text("x = 2\n")
    after = locator_cls.from_function(namespace["f"], str(main)).get_source_stamp()
    assert before != after
    # kernels of the fused module use it
    assert type(fused._layer._cache._impl.locator) is locator_cls


@pytest.mark.parametrize("kernel", [k for k in ("avx2", "vnni", "vnni_emulated") if fused.packed.cpu_features.unavailable_reason(k) is None])
def test_every_simd_path_fuses_bit_for_bit(kernel):
    """Handles forced onto each SIMD path this CPU runs (CI's AVX2 machine runs avx2 and
    vnni_emulated; an AVX-512 VNNI machine all three) give the op chain's exact values."""
    from backends.numba_backend.packed import prepare_packed
    from reference.decode import DecodeLayer
    from tests.test_triangle import _packed_case

    rng = np.random.default_rng(5)
    handles = [prepare_packed(*_packed_case(rng, m, k, 64), 64, kernel=kernel)
               for m, k in [(256, 128), (128, 128), (512, 128), (128, 256)]]
    norms = [rng.uniform(0.5, 1.5, n).astype(np.float32) for n in (128, 128, 128, 256)]
    layer = DecodeLayer(1e-6, norms[0], handles[0], 4, 2, 32, norms[1], handles[1], norms[2], handles[2], 256,
                        "swiglu", norms[3], handles[3])
    assert fused.supports(layer) and layer.qkv.kernel == kernel
    x = rng.standard_normal((3, 128)).astype(np.float32)
    cos, sin = reference.OPS["rope_tables"](np.arange(4, 7), 32, 10000.0, np.float32)
    caches = [rng.standard_normal((1, 12, 2, 32)).astype(np.float32) for _ in range(2)]
    k1, v1, k2, v2 = caches[0].copy(), caches[1].copy(), caches[0].copy(), caches[1].copy()
    np.testing.assert_array_equal(nb.decode_layer(x, layer, k1, v1, 4, cos, sin), compose(nb.op, x, layer, k2, v2, 4, cos, sin))
    np.testing.assert_array_equal(k1, k2)
