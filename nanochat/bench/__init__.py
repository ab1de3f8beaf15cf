"""The E3 benchmark suite: ``python -m nanochat.bench e3|report``.

- ``nanochat.bench.e3``: the plan, the measurements and the runner (it drives ``Trainer.train``
  through callbacks, so the numbers come from the trainer's own loop);
- ``nanochat.bench.report``: the claims analysed from ``results.json``, ``REPORT.md`` and plots;
- ``nanochat.bench.cli``: the command line.
"""
from nanochat.bench.cli import main, parse_args
from nanochat.bench.e3 import (
    BASELINE, E3_PRESETS, MICRO_BENCHMARKS, TIME_FIELDS, BackwardProfile, BenchError, Plan, cpu_name,
    float32_muon_state_bytes, load_plan_config, run_suite, timing_summary, tokens_to_reach,
)
from nanochat.bench.e3 import _clear_grads, _graph_functions
from nanochat.bench.report import analyse, render_report, write_report

__all__ = ["BASELINE", "E3_PRESETS", "MICRO_BENCHMARKS", "TIME_FIELDS", "BackwardProfile", "BenchError", "Plan",
           "analyse", "cpu_name", "float32_muon_state_bytes", "load_plan_config", "main", "parse_args",
           "render_report", "run_suite", "timing_summary", "tokens_to_reach", "write_report",
           "_clear_grads", "_graph_functions"]
