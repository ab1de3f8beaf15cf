"""Benchmark (not a test): the ``tiny`` preset, 1 rank x 2 threads vs 2 ranks x 1 thread.

Both train the same global batch (1 x 8 sequences vs 2 x 4) on the default corpus with the numba
backend. Runs alternate (A B A B ...) so load from other processes hits both alike; the report
gives medians of the runs' steady-state numbers from ``metrics.jsonl`` (the first logged window,
which includes numba compilation, is dropped).

    .venv/bin/python benchmarks/distributed/bench_tiny.py --steps 15 --reps 2 --out benchmarks/distributed/tiny_bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(kind, steps, workdir):
    out = Path(workdir) / kind
    common = ["--config", "tiny", "--backend", "numba", "--steps", str(steps), "--quiet", "--out", str(out),
              "--set", "train.eval_every=0", "--set", "train.sample_tokens=0", "--set", "train.log_every=5",
              "--set", "train.tensorboard=false", "--set", f"optim.warmup_steps={max(1, steps // 10)}"]
    env = dict(os.environ)
    if kind == "1x2":
        env["NANOCHAT_THREADS"] = "2"
        cmd = [sys.executable, "-m", "nanochat.train", *common, "--set", "train.batch_size=8"]
    else:
        env["NANOCHAT_THREADS"] = "1"
        cmd = [sys.executable, "-m", "nanochat.train", "--nproc", "2", *common, "--set", "train.batch_size=4"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"][1:]  # drop the compile window
    tok_s = statistics.median(r["tokens_per_sec"] for r in train)
    step = statistics.median(r["time_step"] for r in train)
    comm = statistics.median(r.get("time_comm", 0.0) for r in train)
    return {"tokens_per_sec": tok_s, "time_step": step, "time_comm": comm, "comm_share": comm / step}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    results = {"1x2": [], "2x1": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.reps):
            for kind in ("1x2", "2x1"):
                r = run(kind, a.steps, Path(tmp) / f"{kind}-{rep}")
                results[kind].append(r)
                print(kind, rep, {k: round(v, 4) for k, v in r.items()}, flush=True)
    summary = {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for kind, rs in results.items()}
    summary["speedup_2x1_over_1x2"] = summary["2x1"]["tokens_per_sec"] / summary["1x2"]["tokens_per_sec"]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    report = {"steps": a.steps, "reps": a.reps, "runs": results, "median": summary, "loadavg_at_end": load,
              "cpu_count": os.cpu_count()}
    print(json.dumps(summary, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
