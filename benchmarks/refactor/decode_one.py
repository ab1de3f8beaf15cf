"""Decode rate of one tree (old engine API or new), for side-by-side runs with PYTHONPATH=TREE:

    PYTHONPATH=/path/to/tree python benchmarks/refactor/decode_one.py CONFIG STEPS REPEATS

Random weights, a 16-token prompt, then STEPS greedy decode steps; prints the median and best
tokens/s over REPEATS runs (after one untimed run).
"""
import statistics, sys, time
import numpy as np
from nanochat.config import load_config
try:
    from nanochat.infer.engine import Engine, random_model
    new = True
except ImportError:
    from nanochat.engine import Engine, random_model
    new = False
from backends import get_backend

name, steps, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = load_config(name)
loaded = random_model(cfg)
prompt = np.random.default_rng(1).integers(0, cfg.model.vocab_size, 16)
be = get_backend("numba")
eng = Engine(loaded, "numba" if new else be, max_len=16 + steps + 2)
rates = []
for r in range(repeats + 1):
    if new:
        seq = eng.new_sequence(); logits = eng.prefill(seq, prompt)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = eng.decode([seq], [int(np.argmax(logits))])[0]
    else:
        eng.reset(); logits = eng.feed(prompt)[-1]
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = eng.step(int(np.argmax(logits)))
    dt = time.perf_counter() - t0
    if r:
        rates.append(steps / dt)
print(f"{statistics.median(rates):.1f} {max(rates):.1f}")
