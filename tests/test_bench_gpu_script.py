"""scripts/bench_gpu.py runs end to end on the CPU emulator at toy sizes, so a lent GPU's
few minutes are not lost to a broken benchmark script."""
import importlib.util
import json
from pathlib import Path


from backends.cupy_backend import emulator as cuda_emulator

pytestmark = cuda_emulator.skip_without_compiler()


def test_gpu_benchmark_script_dry_run(tmp_path, monkeypatch):
    import backends

    # The script registers the emulated backend as "cupy"; undo that after the test.
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(backends, "_CACHE", dict(backends._CACHE))
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    out = tmp_path / "bench.json"
    assert bench_gpu.main(["--emulated", "--small", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert not [k for k in results if k.endswith("_error")]
    gemm = next(v for k, v in results.items() if k.startswith("gemm_"))
    assert gemm["kernel"] == "mma" and gemm["rel_err_vs_float64_40_tokens"] < 1e-6
    gemv = next(v for k, v in results.items() if k.startswith("gemv_"))
    assert gemv["rel_err_vs_float64"] < 1e-6
    attention = next(v for k, v in results.items() if k.startswith("attention_"))
    assert attention["max_rel_err_of_gradients"] < 1e-5
    for preset in ("tiny", "nano_125m"):
        assert results[f"train_step_{preset}"]["backend"] == "cupy-emulated"


def test_target_verdicts_read_the_measured_ratios():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu_verdicts", path)
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    got = bench_gpu.verdicts({"gemm_8192x4096x4096_g256": {"ratio_mma_vs_fp16": 0.8},
                              "gemv_8192x8192_g256": {"fraction_of_copy_bandwidth": 0.75}})
    assert list(got.values()) == ["FAIL (0.800)", "PASS (0.750)"]
    assert set(bench_gpu.verdicts({}).values()) == {"not measured"}
