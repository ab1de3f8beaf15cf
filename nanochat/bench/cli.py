"""``python -m nanochat.bench e3|report|worker``: the E3 suite's command line."""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from nanochat.bench.e3 import (E3_PRESETS, MICRO_BENCHMARKS, REPORT_FILE, RESULTS_FILE, BenchError, Plan,
                               load_plan_config, run_suite, worker_main)
from nanochat.bench.report import analyse, write_report
from nanochat.cli.common import backend_choices


# ------------------------------------------------------------------------------------ CLI


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m nanochat.bench", description="The E3 benchmark suite.")
    sub = p.add_subparsers(dest="command", required=True)
    e3 = sub.add_parser("e3", help="run the E3 suite and write REPORT.md, results.json and plots")
    e3.add_argument("--backend", default="auto", choices=backend_choices())
    e3.add_argument("--out", default=None, help="output directory (default benchmarks/e3-<timestamp>)")
    e3.add_argument("--data", default=None, help="corpus: text file, directory or .bin (default: the Python stdlib)")
    e3.add_argument("--cache-dir", default=None, help="tokenizer/token-shard cache (default ~/.cache/nanochat-ternary)")
    e3.add_argument("--quick", action="store_true", help="a few steps per config and short micro-benchmarks (CI)")
    e3.add_argument("--scale", type=int, default=1, help="widen the model and batch N times (GPU runs)")
    e3.add_argument("--steps", type=int, default=None, help="steps per config instead of the presets'")
    e3.add_argument("--only", default=None, help=f"comma-separated parts to run (default all: {','.join(E3_PRESETS + MICRO_BENCHMARKS)})")
    e3.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied to every config (repeatable)")
    e3.add_argument("--in-process", action="store_true", help="run every part in this process (faster start, shared peak RSS)")
    rep = sub.add_parser("report", help="render REPORT.md and the plots again from DIR/results.json")
    rep.add_argument("dir")
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("task")
    w.add_argument("result")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.command == "worker":
        return worker_main(args.task, args.result)
    if args.command == "report":
        path = Path(args.dir) / RESULTS_FILE
        if not path.is_file():
            print(f"error: {path}: no results.json in this directory", file=sys.stderr)
            return 2
        print(write_report(json.loads(path.read_text()), args.dir))
        return 0
    from nanochat.config import ConfigError

    try:
        plan = Plan.make(
            quick=args.quick, backend=args.backend, data=args.data, cache_dir=args.cache_dir, scale=args.scale,
            steps=args.steps, overrides=args.overrides, in_process=args.in_process,
            only=[s.strip() for s in args.only.split(",") if s.strip()] if args.only else None,
        )
        if plan.steps is not None and plan.steps < 1:
            raise BenchError(f"--steps must be >= 1, got {plan.steps}")
        for name in E3_PRESETS:
            load_plan_config(plan, name)  # every config validates before anything runs
        out = Path(args.out or Path("benchmarks") / f"e3-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        results = run_suite(plan, out, command="python -m nanochat.bench " + " ".join(argv))
    except (BenchError, ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for c in analyse(results)["claims"]:
        print(f"{c['verdict']:<32} {c['claim']}: {c['measured']}")
    print(f"report: {out / REPORT_FILE}")
    return 0
