"""Alternate project and PyTorch-peer runs back to back and print the tokens/s ratios.

    .venv/bin/python benchmarks/peer/compare.py --rounds 3                       # project vs eager vs compiled
    .venv/bin/python benchmarks/peer/compare.py --rounds 3 --only project,eager
    .venv/bin/python benchmarks/peer/compare.py --busy --rounds 3                 # idle vs one competing process

Each run is its own process (``project_step.py`` with this tree's Python, ``torch_peer.py``
with ``--torch-python``, default /work/peer-venv/bin/python); every round runs each contender
once, in turn, so slow drifts of a shared machine hit all of them alike. The summary gives the
median of the per-run medians, the range over rounds, and ratios of medians.

``--busy``: the project alone, alternating idle and with one competing CPU-bound process
(``python -c 'while True: pass'``), with and without the thread policy; prints the busy/idle
fraction (issue 17's target: >= 40%).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def run_json(cmd, env=None, timeout=1800):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Competitor:
    """One CPU-bound process for the duration of a ``with`` block."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def summarise(results, base):
    rows = []
    med = {}
    for name, runs in results.items():
        tps = [r["tokens_per_s"] for r in runs]
        med[name] = statistics.median(tps)
        phases = {k: statistics.median(r[k] for r in runs) for k in ("forward_s", "backward_s", "optimizer_s")}
        rows.append((name, med[name], min(tps), max(tps), phases, runs[-1].get("peak_rss_mib")))
    print(f"{'contender':<28} {'tokens/s':>9} {'range':>15} {'fwd/bwd/opt s':>20} {'RSS MiB':>8}")
    for name, m, lo, hi, ph, rss in rows:
        print(f"{name:<28} {m:9.0f} {lo:7.0f}-{hi:<7.0f} "
              f"{ph['forward_s']:.3f}/{ph['backward_s']:.3f}/{ph['optimizer_s']:.3f} {rss or 0:8.0f}")
    if base in med:
        for name in med:
            if name != base:
                print(f"ratio {base} / {name}: {med[base] / med[name]:.2f}x")
    return med


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shape", default="tiny")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--only", default="project,eager,compiled",
                   help="comma-separated contenders: project, eager, compiled, torch-muon")
    p.add_argument("--torch-python", default=os.environ.get("PEER_PYTHON", "/work/peer-venv/bin/python"))
    p.add_argument("--competitor", action="store_true", help="run every contender next to one CPU-bound process")
    p.add_argument("--busy", action="store_true", help="project only: idle vs one competing process, policy on/off")
    p.add_argument("--json", default=None, help="write all runs here")
    args = p.parse_args(argv)

    common = ["--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.batch:
        common += ["--batch", str(args.batch)]
    project = [sys.executable, str(HERE / "project_step.py")] + common
    torch_cmd = [args.torch_python, str(HERE / "torch_peer.py")] + common
    if args.busy:
        contenders = {
            "project idle, policy": (project, False),
            "project busy, policy": (project, True),
            "project idle, no policy": (project + ["--no-thread-policy"], False),
            "project busy, no policy": (project + ["--no-thread-policy"], True),
        }
    else:
        table = {
            "project": project,
            "eager": torch_cmd,
            "compiled": torch_cmd + ["--compile"],
            "torch-muon": torch_cmd + ["--torch-muon"],
        }
        contenders = {name: (table[name], args.competitor) for name in args.only.split(",")}
    results = {name: [] for name in contenders}
    for r in range(args.rounds):
        for name, (cmd, busy) in contenders.items():
            if busy:
                with Competitor():
                    res = run_json(cmd)
            else:
                res = run_json(cmd)
            results[name].append(res)
            print(f"round {r + 1} {name}: {res['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    print(f"machine: {os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.2f}; "
          f"{args.rounds} rounds, {args.steps} timed steps per run (median step)")
    med = summarise(results, "project" if not args.busy else "project idle, policy")
    if args.busy:
        for mode in ("policy", "no policy"):
            idle, busy = med[f"project idle, {mode}"], med[f"project busy, {mode}"]
            print(f"busy / idle, {mode}: {busy / idle:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
