"""Time this project's training step on the peer-matched model (random tokens).

    .venv/bin/python benchmarks/peer/project_step.py --steps 12 --warmup 3
    .venv/bin/python benchmarks/peer/project_step.py --shape nano_125m --batch 4

The model is the ``tiny`` preset with ``group_size = 128`` and no SubLN (dim 256, 4 layers,
ffn 768, seq 256, batch 8, vocab 4096), Muon (float32 Newton-Schulz) on the BitLinear weights
and AdamW on the rest, gradient clipping at 1.0: the trainer's own ``build_optimizers``.
Tokens are uniform random ids from a fixed seed, so two runs see the same batches.

Prints one JSON line: median step time and tokens/s, per-phase medians (forward, backward,
optimizer), the spread, and the loss of every step (``--losses`` writes them to a file too).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from statistics import median
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# NANOCHAT_FROM=DIR takes the nanochat package from DIR (e.g. a `git archive` of a fixed commit)
# and backends/reference from this tree, so a backend change is timed against fixed model code.
if os.environ.get("NANOCHAT_FROM"):
    sys.path.insert(0, os.environ["NANOCHAT_FROM"])

SHAPES = {
    # name: (preset, overrides)
    "tiny": ("tiny", ["model.group_size=128", "model.sub_norm=false"]),
    # the peer has neither MTP heads nor Collider's token filtering (the preset has both)
    "nano_125m": ("nano_125m", ["model.group_size=128", "model.sub_norm=false", "model.mtp_n_tokens=0",
                                "train.collider_sparsity=0"]),
}


def _first(*candidates):
    """The first importable ``module:attr`` of ``candidates`` (the nanochat package may move)."""
    errors = []
    for c in candidates:
        module, attr = c.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{c}: {exc}")
    raise ImportError("none of " + "; ".join(errors))


def load_api():
    load_config = _first("nanochat.config:load_config", "nanochat.train.config:load_config",
                         "nanochat.model.config:load_config")
    Model = _first("nanochat.model:Model", "nanochat.model.gpt:Model", "nanochat.model.model:Model")
    build_optimizers = _first("nanochat.train:build_optimizers", "nanochat.train.trainer:build_optimizers",
                              "nanochat.train.optimizers:build_optimizers", "nanochat.train.optim:build_optimizers")
    lr_multiplier = _first("nanochat.train:lr_multiplier", "nanochat.train.trainer:lr_multiplier",
                           "nanochat.train.optimizers:lr_multiplier", "nanochat.train.schedule:lr_multiplier")
    try:  # newer trees: the model returns hidden states and the trainer forms the loss
        compute_loss = _first("nanochat.train.losses:compute_loss")
    except ImportError:
        compute_loss = None
    return load_config, Model, build_optimizers, lr_multiplier, compute_loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--steps", type=int, default=12, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (JIT, first-touch)")
    p.add_argument("--backend", default="numba")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-thread-policy", action="store_true",
                   help="leave the thread pools as numba/numpy set them (the behaviour before backends.threads)")
    p.add_argument("--losses", default=None, help="write the per-step losses here (JSON list)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    adapt = None
    policy = None
    if not args.no_thread_policy:
        try:
            from backends import threads
        except ImportError:  # a tree from before backends.threads
            threads = None
        if threads is not None:
            policy = threads.apply_thread_policy()
            adapt = threads.adapt_threads
        try:  # what the trainer's start_training also does
            from backends.memory import keep_freed_memory

            keep_freed_memory()
        except ImportError:  # a tree from before backends.memory
            pass

    import numpy as np
    import backends

    load_config, Model, build_optimizers, lr_multiplier, compute_loss = load_api()
    preset, overrides = SHAPES[args.shape]
    overrides = list(overrides) + [f"train.backend={args.backend}"]
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    overrides += args.overrides
    total = args.warmup + args.steps
    overrides.append(f"train.steps={max(total, 2)}")
    cfg = load_config(preset, overrides)
    be = backends.get_backend(args.backend)
    model = Model(cfg.model, be, seed=cfg.train.seed)
    groups = build_optimizers(model, cfg)
    params = list(model.params.values())
    b, t, v = cfg.train.batch_size, cfg.model.seq_len, cfg.model.vocab_size
    rng = np.random.default_rng(args.seed)

    fwd, bwd, opt, tot, losses, cpu = [], [], [], [], [], []
    for step in range(total):
        batch = rng.integers(0, v, size=(b, t + 1), dtype=np.int64)
        if adapt is not None:
            adapt()  # what the trainer does once per step
        c0 = time.process_time()
        t0 = time.perf_counter()
        for q in params:
            q.grad = None
        res = model.forward(batch) if compute_loss is None else compute_loss(model, batch)
        t1 = time.perf_counter()
        res.loss.backward()
        t2 = time.perf_counter()
        grads = [q.grad for q in params]
        be.clip_by_global_norm(grads, cfg.optim.grad_clip)
        mult = lr_multiplier(step, cfg)
        for _, o, base in groups:
            o.lr = base * mult
            o.step()
        for q in params:
            q.grad = None
        t3 = time.perf_counter()
        losses.append(float(res.ce))
        if step >= args.warmup:
            fwd.append(t1 - t0); bwd.append(t2 - t1); opt.append(t3 - t2); tot.append(t3 - t0)
            cpu.append(time.process_time() - c0)
    med = median(tot)
    out = {
        "who": "project", "backend": args.backend, "shape": args.shape, "batch": b, "seq": t,
        "params": int(model.num_parameters()), "steps": len(tot),
        "step_s": med, "tokens_per_s": b * t / med,
        "step_min_s": min(tot), "step_max_s": max(tot),
        "cpu_s": median(cpu), "forward_s": median(fwd), "backward_s": median(bwd), "optimizer_s": median(opt),
        "thread_policy": policy if adapt is None else dict(threads.policy().describe(), start=policy),
        "loss_first": losses[0], "loss_last": losses[-1],
    }
    try:
        import resource
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:
        pass
    if args.losses:
        Path(args.losses).write_text(json.dumps(losses))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
