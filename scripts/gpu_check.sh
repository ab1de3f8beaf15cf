#!/usr/bin/env bash
# One short GPU check for a lent CUDA machine (no network there, nothing to install):
# prints the device, runs the cupy triangle tests and the GPU benchmarks, and writes
# everything under $OUT (default ./gpu-results). Pure-Python dependencies missing on the
# device can be carried in .gpu_deps/ (pip install --target .gpu_deps tokenizers ...).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -d .gpu_deps ]; then export PYTHONPATH="$PWD/.gpu_deps:${PYTHONPATH:-}"; fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" - <<'PY'
import cupy, sys
print("python", sys.version.split()[0], "cupy", cupy.__version__,
      "device", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
PY
} 2>&1 | tee "$OUT/device.txt"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m "triangle or gpu" -k "not emulated" tests/test_triangle.py tests/test_cupy_compile.py 2>&1 | tail -40 | tee "$OUT/triangle.txt"
timeout 240 "$PY" scripts/bench_gpu.py --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench.txt"
# Data parallelism on one rank through the NCCL communicator (docs/distributed.md); NCCL comes
# from nvidia-nccl-cu12 or the system (without it nccl.txt says so); mpi4py is optional (one rank
# needs no bootstrap).
timeout 60 "$PY" scripts/nccl_check.py 2>&1 | tail -5 | tee "$OUT/nccl.txt"
# Out-of-bounds accesses and shared-memory races are what the CPU emulator cannot show:
# run the cupy Triangle once more under compute-sanitizer (last, so it cannot crowd out the
# results above).
# Worst case with the timeouts: 240 + 240 + 60 (NCCL) + 90 s; a 10-minute device call cuts the
# sanitizer short first;
# SANITIZE_RACES=1 adds racecheck (another 90 s).
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck ${SANITIZE_RACES:+racecheck}; do
    timeout 90 compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" -m pytest -q -p no:cacheprovider \
      -m triangle -k "cupy and not emulated" tests/test_triangle.py 2>&1 | tail -30 | tee "$OUT/sanitizer_$tool.txt"
  done
fi
echo "results in $OUT"
