"""The E3 benchmark suite: ``python -m nanochat.bench e3 [--backend ...] [--out DIR] [--quick] [--scale N]``.

Trains the five E3 presets (``e3_baseline``, ``e3_mtp_only``, ``e3_muon_8bit``, ``e3_galore2``,
``e3_full``: one model, one data order, one token budget) each in a fresh process, then runs two
micro-benchmarks on the baseline model: Collider (backward time with 40% of the tokens filtered
vs dense, with a per-op breakdown) and the data loader (data-wait fraction of the step time,
synchronous vs asynchronous). It writes ``results.json`` (every measurement), ``REPORT.md`` and
PNG plots; every number in the report is read from ``results.json``.

``python -m nanochat.bench report DIR`` renders REPORT.md and the plots again from DIR/results.json.
Method and decisions: docs/e3.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from nanochat.cli.common import backend_choices
from nanochat.train.losses import compute_loss

E3_PRESETS = ("e3_baseline", "e3_mtp_only", "e3_muon_8bit", "e3_galore2", "e3_full")
MICRO_BENCHMARKS = ("collider", "loader")
BASELINE = "e3_baseline"
RESULTS_FILE = "results.json"
REPORT_FILE = "REPORT.md"
RESULTS_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]

# Targets of issue 6 (the thresholds each claim is judged against).
COLLIDER_SPARSITY = 0.4
TARGET_MUON8_RATIO = 0.27
TARGET_GALORE_RATIO = 0.5
TARGET_FULL_RATIO = 0.15
TARGET_LOSS_SLACK = 0.02
TARGET_COLLIDER_RATIO = 0.75
TARGET_DATA_WAIT = 0.02
# What the replaced system claimed, as numbers a measurement can be held against.
CLAIM_MTP_EFFICIENCY = 0.15          # "15-20% data efficiency": at least 15% fewer tokens
CLAIM_COLLIDER_SPEEDUP = 1.35        # "35% faster backprop": 1.35x backward speed
CLAIM_MUON8_REDUCTION = 0.86
CLAIM_GALORE_REDUCTION = 0.50        # "50-65%": at least the lower end
CLAIM_FULL_REDUCTION = 0.95
CLAIM_UTILISATION = 0.90

TIME_FIELDS = ("forward", "backward", "optimizer", "data_wait", "total")


class BenchError(RuntimeError):
    """A benchmark that could not run (bad option, failed worker)."""


# --------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """What one suite run measures; stored in results.json so a report says how it was made."""

    backend: str = "auto"
    data: str | None = None
    cache_dir: str | None = None
    quick: bool = False
    scale: int = 1
    steps: int | None = None            # override of the presets' step count
    overrides: list = field(default_factory=list)
    only: list = field(default_factory=lambda: list(E3_PRESETS + MICRO_BENCHMARKS))
    in_process: bool = False
    warmup_steps: int = 5               # first steps left out of the timing statistics
    collider_reps: int = 12             # timed forward+backward pairs per Collider mode
    profile_reps: int = 4               # profiled backward passes per Collider mode (per-op medians)
    loader_steps: int = 20

    @classmethod
    def make(cls, quick=False, **kwargs):
        plan = cls(quick=quick, **{k: v for k, v in kwargs.items() if v is not None})
        if quick:
            plan.warmup_steps = 1
            plan.collider_reps = 2
            plan.profile_reps = 1
            plan.loader_steps = 3
        if plan.scale < 1:
            raise BenchError(f"--scale must be an integer >= 1, got {plan.scale}")
        unknown = [n for n in plan.only if n not in E3_PRESETS + MICRO_BENCHMARKS]
        if unknown:
            raise BenchError(f"--only names unknown parts {unknown}; choose from {', '.join(E3_PRESETS + MICRO_BENCHMARKS)}")
        return plan


def scale_overrides(cfg, scale):
    """Widen the model ``scale`` times at a fixed head size and grow the batch to match (GPU runs).

    The GaLore rank and minimum projected size follow the width (the rank stays dim / 4 and the
    same matrices are projected); the step count is unchanged, so the token budget grows
    ``scale`` times with the batch.
    """
    if scale == 1:
        return []
    m, o, t = cfg.model, cfg.optim, cfg.train
    return [
        f"model.dim={m.dim * scale}", f"model.n_heads={m.n_heads * scale}",
        f"model.n_kv_heads={m.n_kv_heads * scale}", f"model.ffn_hidden={m.ffn_hidden * scale}",
        f"optim.galore_rank={o.galore_rank * scale}", f"optim.galore_min_dim={o.galore_min_dim * scale}",
        f"train.batch_size={t.batch_size * scale}",
    ]


def config_overrides(plan, preset):
    """Every override a preset gets in this plan (order: scale, quick, data, backend, user)."""
    from nanochat.config import load_config

    base = load_config(preset)
    out = scale_overrides(base, plan.scale)
    steps = plan.steps if plan.steps is not None else (4 if plan.quick else base.train.steps)
    out.append(f"train.steps={steps}")
    if plan.quick:
        out += [f"train.eval_every={max(1, steps // 2)}", "train.eval_batches=2"]
    if plan.data:
        out.append(f'data.path="{Path(plan.data).resolve().as_posix()}"')
    if plan.cache_dir:
        out.append(f'data.cache_dir="{Path(plan.cache_dir).resolve().as_posix()}"')
    out += [f"train.backend={plan.backend}", "train.tensorboard=false", "train.sample_tokens=0"]
    return out + list(plan.overrides)


def load_plan_config(plan, preset):
    from nanochat.config import load_config

    return load_config(preset, config_overrides(plan, preset))


def load_data(cfg, progress=False):
    from nanochat.data.corpus import prepare_data

    d = cfg.data
    return prepare_data(d.path or None, vocab_size=cfg.model.vocab_size, cache_dir=d.cache_dir or None,
                        progress=progress, val_fraction=d.val_fraction, tokenizer_train_bytes=d.tokenizer_train_bytes)


def make_loader(cfg, tokens, asynchronous):
    from nanochat.data.loader import AsyncLoader, BatchLoader

    t = cfg.train
    args = (tokens, t.batch_size, cfg.model.seq_len, t.seed)
    if asynchronous:
        return AsyncLoader(*args, workers=t.loader_workers, prefetch=t.loader_prefetch)
    return BatchLoader(*args)


# ------------------------------------------------------------------------- measurements


def peak_rss_bytes():
    """Peak resident set size of this process so far (None where the OS does not report it)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes, Linux: KiB


def gpu_pool_bytes(be):
    """Bytes CuPy's memory pool holds (its high-water mark: the pool keeps freed blocks); None off GPU."""
    if be.name != "cupy":
        return None
    return int(be.xp.get_default_memory_pool().total_bytes())


def float32_muon_state_bytes(params, be):
    """Measured state bytes of a plain float32 Muon over matrices shaped like ``params``."""
    from reference import optim as ref_optim

    xp = be.xp
    shadows = [SimpleNamespace(data=xp.zeros(p.shape, np.float32), grad=xp.zeros(p.shape, np.float32)) for p in params]
    opt = ref_optim.Muon(shadows, lr=0.0, kernels=be)
    opt.step()
    return int(opt.state_nbytes())


def state_bytes_by_array(opt):
    """Measured state bytes of an optimizer split by state-array name (``buf``, ``qbuf``, ``scales``, ``P``, ...)."""
    out = {}
    for state in (opt.state if opt is not None else []):
        for name, a in state.items():
            out[name] = out.get(name, 0) + int(a.nbytes)
    return out


def timing_summary(step_times, warmup):
    """Mean seconds per step of each phase over the steps after ``warmup`` (all steps if too few)."""
    rows = step_times[warmup:] if len(step_times) > warmup else step_times
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, len(TIME_FIELDS))
    mean = arr.mean(axis=0) if len(arr) else np.full(len(TIME_FIELDS), float("nan"))
    return {"steps_timed": len(arr), **{f: float(v) for f, v in zip(TIME_FIELDS, mean)}}


def tokens_to_reach(curve, target):
    """First token count at which a validation curve ``[(tokens, loss), ...]`` is at or below ``target``.

    Linear interpolation between the two evaluations around the crossing; None if it never gets there.
    """
    prev = None
    for tokens, loss in curve:
        if loss <= target:
            if prev is None or prev[1] <= target:
                return float(tokens)
            t0, l0 = prev
            return float(t0 + (l0 - target) / (l0 - loss) * (tokens - t0))
        prev = (tokens, loss)
    return None


class BackwardProfile:
    """Seconds spent in each op's backward (by Function class name) during ``Tensor.backward`` calls.

    Inside the ``with`` block the backward of every Function class found in ``root``'s graph is
    wrapped with a timer (and a device synchronisation, so GPU time lands on the right op).
    """

    def __init__(self, root, synchronize):
        self.classes = _graph_functions(root)
        self.synchronize = synchronize
        self.seconds: dict[str, float] = {}
        self._saved = []

    def __enter__(self):
        for cls in self.classes:
            own = cls.__dict__.get("backward")
            self._saved.append((cls, own))
            setattr(cls, "backward", staticmethod(self._timed(cls.backward, cls.__name__)))
        return self

    def _timed(self, fn, name):
        def backward(ctx, *grads):
            t0 = time.perf_counter()
            out = fn(ctx, *grads)
            self.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            return out
        return backward

    def __exit__(self, *exc):
        for cls, own in reversed(self._saved):
            if own is None:
                delattr(cls, "backward")
            else:
                setattr(cls, "backward", own)
        self._saved.clear()


def _graph_functions(root):
    classes, seen, stack = [], set(), [root._node[0]] if root._node is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.function not in classes:
            classes.append(node.function)
        stack.extend(p._node[0] for p in node.parents if p is not None and p._node is not None)
    return classes


def _clear_grads(model):
    for p in model.params.values():
        p.grad = None


# --------------------------------------------------------------------------------- workers


def _log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_config(plan, preset, out_dir):
    """Train one preset for its steps; measure losses, timing, optimizer state and memory."""
    from nanochat.train.metrics import MetricsLogger
    from nanochat.train.trainer import Trainer, TrainingError

    cfg = load_plan_config(plan, preset)
    data = load_data(cfg)
    trainer = Trainer(cfg, out_dir=Path(out_dir) / "runs" / preset, progress=False, data=data)
    be, t = trainer.be, cfg.train
    tokens_per_step = t.batch_size * cfg.model.seq_len * t.grad_accum
    logger = MetricsLogger(trainer.out_dir, tensorboard=False)
    t_start = time.perf_counter()
    val_curve = [[0, 0, trainer.evaluate()]]
    logger.log({"kind": "val", "step": 0, "tokens": 0, "val_loss": val_curve[0][2]})
    step_times, train_curve, eval_seconds = [], [], 0.0
    loader = make_loader(cfg, data.train_tokens, t.async_loader)
    try:
        while trainer.state.step < t.steps:
            rec = trainer.train_step(loader)  # advances state.step and state.tokens when the update is applied
            times = rec.pop("times")
            if not rec["finite"]:
                if trainer.state.nonfinite_in_row >= t.max_nonfinite_steps:
                    raise TrainingError(f"{preset}: {trainer.state.nonfinite_in_row} non-finite steps in a row "
                                        f"at step {trainer.state.step}")
                continue
            step = trainer.state.step
            step_times.append([getattr(times, f) for f in TIME_FIELDS])
            train_curve.append([step, rec["loss"], rec["ce"], rec["mtp"]])
            logger.log({"kind": "train", "step": step, "tokens": trainer.state.tokens, "loss": rec["loss"],
                        "ce": rec["ce"], "mtp": rec["mtp"], "grad_norm": rec["grad_norm"], "lr": rec["lr"],
                        "time_step": times.total, "time_forward": times.forward, "time_backward": times.backward,
                        "time_optimizer": times.optimizer, "time_data_wait": times.data_wait})
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                e0 = time.perf_counter()
                v = trainer.evaluate()
                eval_seconds += time.perf_counter() - e0
                val_curve.append([step, trainer.state.tokens, v])
                logger.log({"kind": "val", "step": step, "tokens": trainer.state.tokens, "val_loss": v})
                _log(f"{preset}: step {step}/{t.steps}, validation CE {v:.4f}")
    finally:
        if hasattr(loader, "close"):
            loader.close()
        logger.close()
    wall = time.perf_counter() - t_start
    peak_rss, gpu_pool = peak_rss_bytes(), gpu_pool_bytes(be)  # before the reference Muon below
    groups = {label: int(opt.state_nbytes()) for label, opt, _ in trainer.optimizers}
    hidden_opt = next((opt for label, opt, _ in trainer.optimizers if label == "hidden"), None)
    hidden = hidden_opt.params if hidden_opt is not None else []
    timing = timing_summary(step_times, plan.warmup_steps)
    m = cfg.model
    return {
        "preset": preset,
        "backend": be.name,
        "backend_description": be.description,
        "config": cfg.to_dict(),
        "model": {"dim": m.dim, "n_layers": m.n_layers, "n_heads": m.n_heads, "ffn_hidden": m.ffn_hidden,
                  "seq_len": m.seq_len, "vocab_size": m.vocab_size, "mtp_n_tokens": m.mtp_n_tokens,
                  "parameters": trainer.model.num_parameters(),
                  "hidden_parameters": int(sum(p.size for p in hidden))},
        "steps": trainer.state.step,
        "skipped_steps": trainer.state.skipped,
        "tokens_per_step": tokens_per_step,
        "tokens": trainer.state.tokens,
        "val_curve": val_curve,
        "train_curve": train_curve,
        "final_val_loss": val_curve[-1][2],
        "step_times": step_times,
        "timing": timing,
        "tokens_per_sec": tokens_per_step / timing["total"] if timing["total"] > 0 else None,
        "data_wait_fraction": timing["data_wait"] / timing["total"] if timing["total"] > 0 else None,
        "async_loader": t.async_loader,
        "optimizer_state_bytes": {"groups": groups, "hidden": groups.get("hidden", 0), "total": sum(groups.values()),
                                  "hidden_by_array": state_bytes_by_array(hidden_opt),
                                  "hidden_float32_muon": float32_muon_state_bytes(hidden, be)},
        "peak_rss_bytes": peak_rss,
        "gpu_pool_bytes": gpu_pool,
        "wall_seconds": wall,
        "eval_seconds": eval_seconds,
    }


_OP_CATEGORIES = {"TernaryLinear": "BitLinear (ternary_linear)", "DenseLinear": "LM head (dense_linear)"}


def _op_category(name):
    return _OP_CATEGORIES.get(name, name)


def run_collider(plan, out_dir):
    """Backward time of the baseline model with ``COLLIDER_SPARSITY`` of each sequence filtered vs dense.

    Both modes run on the same batches, alternating which goes first; a profiled pass per mode
    splits the backward by op.
    """
    import backends
    from nanochat.data.loader import BatchLoader
    from nanochat.model.gpt import Model

    cfg = load_plan_config(plan, BASELINE)
    data = load_data(cfg)
    be = backends.get_backend(cfg.train.backend)
    model = Model(cfg.model, be, seed=cfg.train.seed)
    source = BatchLoader(data.train_tokens, cfg.train.batch_size, cfg.model.seq_len, cfg.train.seed)
    modes = {"dense": 0.0, "sparse": COLLIDER_SPARSITY}

    def once(batch, sparsity):
        t0 = time.perf_counter()
        res = compute_loss(model, batch, collider_sparsity=sparsity)
        be.synchronize()
        t1 = time.perf_counter()
        res.loss.backward()
        be.synchronize()
        t2 = time.perf_counter()
        _clear_grads(model)
        return t1 - t0, t2 - t1, res.kept_fraction

    for mode, s in modes.items():  # warm-up: compilation, allocator, caches
        once(source.batch_at(0), s)
    times = {mode: {"forward": [], "backward": []} for mode in modes}
    kept = None
    for rep in range(plan.collider_reps):
        batch = source.batch_at(rep + 1)
        order = list(modes) if rep % 2 == 0 else list(modes)[::-1]
        for mode in order:
            fwd, bwd, frac = once(batch, modes[mode])
            times[mode]["forward"].append(fwd)
            times[mode]["backward"].append(bwd)
            if mode == "sparse":
                kept = frac
    passes = {mode: [] for mode in modes}
    for rep in range(plan.profile_reps):
        for mode in (list(modes) if rep % 2 == 0 else list(modes)[::-1]):
            res = compute_loss(model, source.batch_at(rep + 1), collider_sparsity=modes[mode])
            with BackwardProfile(res.loss, be.synchronize) as prof:
                res.loss.backward()
            _clear_grads(model)
            by_cat = {}
            for name, sec in prof.seconds.items():
                by_cat[_op_category(name)] = by_cat.get(_op_category(name), 0.0) + sec
            passes[mode].append(by_cat)
    # Per op: the median over the profiled passes.
    profile = {mode: {cat: float(np.median([p.get(cat, 0.0) for p in ps])) for cat in set().union(*ps)}
               for mode, ps in passes.items()}
    med = {m: {k: float(np.median(v)) for k, v in d.items()} for m, d in times.items()}
    return {
        "backend": be.name,
        "sparsity": COLLIDER_SPARSITY,
        "kept_fraction": kept,
        "reps": plan.collider_reps,
        "profile_reps": plan.profile_reps,
        "times": times,
        "median": med,
        "backward_ratio": med["sparse"]["backward"] / med["dense"]["backward"],
        "profile": profile,
        "tokens_per_batch": cfg.train.batch_size * cfg.model.seq_len,
    }


def run_loader(plan, out_dir):
    """Data-wait fraction of the baseline training step with the synchronous and the async loader."""
    cfg = load_plan_config(plan, BASELINE)
    data = load_data(cfg)
    out = {"steps": plan.loader_steps, "workers": cfg.train.loader_workers, "prefetch": cfg.train.loader_prefetch}
    with tempfile.TemporaryDirectory(prefix="nanochat-bench-loader-") as run_dir:  # nothing to keep
        from nanochat.train.trainer import Trainer

        trainer = Trainer(cfg, out_dir=run_dir, progress=False, data=data)
        out["backend"] = trainer.be.name
        for mode in ("sync", "async"):
            loader = make_loader(cfg, data.train_tokens, mode == "async")
            try:
                trainer.train_step(loader)  # warm-up step (not timed)
                wait = total = 0.0
                for _ in range(plan.loader_steps):
                    times = trainer.train_step(loader)["times"]
                    wait += times.data_wait
                    total += times.total
            finally:
                if hasattr(loader, "close"):
                    loader.close()
            out[mode] = {"data_wait_seconds": wait, "step_seconds": total, "data_wait_fraction": wait / total}
    source = make_loader(cfg, data.train_tokens, False)
    n = 200
    t0 = time.perf_counter()
    for i in range(n):
        source.batch_at(i)
    out["batch_build_seconds"] = (time.perf_counter() - t0) / n
    return out


def run_task(plan, name, out_dir):
    if name == "collider":
        return run_collider(plan, out_dir)
    if name == "loader":
        return run_loader(plan, out_dir)
    return run_config(plan, name, out_dir)


def run_task_in_subprocess(plan, name, out_dir):
    """``run_task`` in a fresh interpreter, so peak RSS and allocator state belong to this task alone."""
    with tempfile.TemporaryDirectory(prefix="nanochat-bench-") as tmp:
        task = Path(tmp) / "task.json"
        result = Path(tmp) / "result.json"
        task.write_text(json.dumps({"plan": asdict(plan), "name": name, "out_dir": str(out_dir)}))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        proc = subprocess.run([sys.executable, "-m", "nanochat.bench", "worker", str(task), str(result)],
                              cwd=str(REPO_ROOT), env=env)
        if proc.returncode != 0 or not result.exists():
            raise BenchError(f"benchmark part {name!r} failed (worker exit status {proc.returncode}); see its output above")
        return json.loads(result.read_text())


def worker_main(task_path, result_path):
    task = json.loads(Path(task_path).read_text())
    plan = Plan(**task["plan"])
    result = run_task(plan, task["name"], task["out_dir"])
    Path(result_path).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------- the suite


def environment():
    import numba

    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": _git(["rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_git(["status", "--porcelain", "--untracked-files=no"])),
    }
    return info


def cpu_name():
    """The CPU's model name (for reports), or None when it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(args):
    try:
        out = subprocess.run(["git", *args], cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_suite(plan, out_dir, command=None):
    """Run every part of ``plan`` and write results.json, REPORT.md and the plots into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"suite": "e3", "version": RESULTS_VERSION, "command": command, "plan": asdict(plan),
               "environment": environment(), "configs": {}, "collider": None, "loader": None}
    t0 = time.perf_counter()
    first = next(p for p in E3_PRESETS if p in plan.only) if any(p in plan.only for p in E3_PRESETS) else BASELINE
    cfg = load_plan_config(plan, first)
    _log("preparing the data (tokenizer and token shards are cached after the first run)")
    load_data(cfg, progress=True)
    runner = run_task if plan.in_process else run_task_in_subprocess
    parts = [p for p in E3_PRESETS + MICRO_BENCHMARKS if p in plan.only]
    for i, name in enumerate(parts, 1):
        _log(f"[{i}/{len(parts)}] {name}")
        result = runner(plan, name, out_dir)
        if name in MICRO_BENCHMARKS:
            results[name] = result
        else:
            results["configs"][name] = result
        _write_json(out_dir / RESULTS_FILE, results)  # partial results survive a later failure
    results["wall_seconds"] = time.perf_counter() - t0
    results["environment"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    _write_json(out_dir / RESULTS_FILE, results)
    write_report(results, out_dir)
    return results


def _write_json(path, value):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


# ------------------------------------------------------------------------------- analysis


@dataclass
class ClaimRow:
    claim: str
    target: str
    measured: str
    verdict: str
    passed: bool | None  # None: not measured in this run


def analyse(results):
    """Derived numbers (ratios to the baseline and to float32 Muon, tokens-to-target) and the claim rows."""
    configs = results.get("configs", {})
    base = configs.get(BASELINE)
    derived = {}
    for name, r in configs.items():
        st = r["optimizer_state_bytes"]
        d = {"hidden_state_ratio": st["hidden"] / st["hidden_float32_muon"] if st["hidden_float32_muon"] else None}
        if base is not None:
            b_loss = base["final_val_loss"]
            d["val_loss_delta"] = (r["final_val_loss"] - b_loss) / b_loss
            reach = tokens_to_reach([(tok, v) for _, tok, v in r["val_curve"]], b_loss)
            own = tokens_to_reach([(tok, v) for _, tok, v in base["val_curve"]], b_loss)
            d["tokens_to_baseline_loss"] = reach
            d["tokens_ratio"] = reach / own if reach is not None and own else None
            d["total_state_ratio"] = st["total"] / base["optimizer_state_bytes"]["total"]
        derived[name] = d
    return {"configs": derived, "claims": [asdict(c) for c in claim_rows(results, derived)]}


def _pct(x):
    return f"{100 * x:.1f}%"


def claim_rows(results, derived):
    configs = results.get("configs", {})
    rows = []

    def unmeasured(claim, target, why):
        rows.append(ClaimRow(claim, target, f"not measured ({why})", "n/a", None))

    # MTP
    claim, target = "MTP: 15-20% data efficiency", "e3_mtp_only reaches e3_baseline's final validation CE in fewer tokens"
    d = derived.get("e3_mtp_only", {})
    if "tokens_ratio" not in d:
        unmeasured(claim, target, "needs e3_baseline and e3_mtp_only")
    elif d["tokens_ratio"] is None:
        total = configs["e3_mtp_only"]["tokens"]
        rows.append(ClaimRow(claim, target, f"not reached within {total:,} tokens (ratio > 1)",
                             "FAIL; claim not reproduced", False))
    else:
        r = d["tokens_ratio"]
        ok = r < 1.0
        rows.append(ClaimRow(claim, target, f"{r:.3f}x the baseline's tokens ({_pct(1 - r)} fewer)",
                             _verdict(ok, 1 - r >= CLAIM_MTP_EFFICIENCY), ok))
    # Collider
    col = results.get("collider")
    claim = "Collider: 35% faster backprop"
    target = f"backward time at {100 * COLLIDER_SPARSITY:g}% filtering <= {TARGET_COLLIDER_RATIO}x dense"
    if not col:
        unmeasured(claim, target, "collider micro-benchmark not run")
    else:
        r = col["backward_ratio"]
        ok = r <= TARGET_COLLIDER_RATIO
        rows.append(ClaimRow(claim, target, f"{r:.3f}x dense ({1 / r:.2f}x backward speed)",
                             _verdict(ok, 1 / r >= CLAIM_COLLIDER_SPEEDUP), ok))
    # Optimizer memory
    for preset, claim, limit, reduction in (
        ("e3_muon_8bit", "8-bit Muon: 86% memory reduction", TARGET_MUON8_RATIO, CLAIM_MUON8_REDUCTION),
        ("e3_galore2", "GaLore 2: 50-65% memory reduction", TARGET_GALORE_RATIO, CLAIM_GALORE_REDUCTION),
        ("e3_full", "combined: up to 95% memory reduction", TARGET_FULL_RATIO, CLAIM_FULL_REDUCTION),
    ):
        target = f"{preset} hidden-matrix optimizer state <= {limit}x float32 Muon's"
        d = derived.get(preset)
        if d is None or d.get("hidden_state_ratio") is None:
            unmeasured(claim, target, f"{preset} not run")
            continue
        r = d["hidden_state_ratio"]
        ok = r <= limit
        rows.append(ClaimRow(claim, target, f"{r:.3f}x ({_pct(1 - r)} reduction)", _verdict(ok, 1 - r >= reduction), ok))
    for preset in ("e3_muon_8bit", "e3_galore2", "e3_full"):
        claim = f"{preset}: no quality loss"
        target = f"final validation CE at most {100 * TARGET_LOSS_SLACK:g}% above e3_baseline's"
        d = derived.get(preset, {})
        if "val_loss_delta" not in d:
            unmeasured(claim, target, f"needs e3_baseline and {preset}")
            continue
        delta = d["val_loss_delta"]
        ok = delta <= TARGET_LOSS_SLACK
        rows.append(ClaimRow(claim, target, f"{configs[preset]['final_val_loss']:.4f} vs "
                             f"{configs[BASELINE]['final_val_loss']:.4f} ({100 * delta:+.2f}%)",
                             "PASS" if ok else "FAIL", ok))
    # Loader
    lo = results.get("loader")
    claim, target = "async loader: 90%+ utilisation", f"data wait < {100 * TARGET_DATA_WAIT:g}% of the step time"
    if not lo:
        unmeasured(claim, target, "loader micro-benchmark not run")
    else:
        w = lo["async"]["data_wait_fraction"]
        ok = w < TARGET_DATA_WAIT
        rows.append(ClaimRow(claim, target, f"{100 * w:.3f}% of the step waiting for data "
                             f"({_pct(1 - w)} utilisation); "
                             f"synchronous: {100 * lo['sync']['data_wait_fraction']:.3f}%",
                             _verdict(ok, 1 - w >= CLAIM_UTILISATION), ok))
    return rows


def _verdict(target_met, claim_reproduced):
    return ("PASS" if target_met else "FAIL") + ("; claim reproduced" if claim_reproduced else "; claim not reproduced")


# --------------------------------------------------------------------------------- report


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def _ms(s):
    return f"{1000 * s:.1f}"


def write_report(results, out_dir):
    """REPORT.md plus the PNG plots, all from ``results``."""
    out_dir = Path(out_dir)
    plots = write_plots(results, out_dir)
    (out_dir / REPORT_FILE).write_text(render_report(results, plots), encoding="utf-8")
    return out_dir / REPORT_FILE


def render_report(results, plots):
    a = analyse(results)
    env, plan = results["environment"], results["plan"]
    configs = results.get("configs", {})
    lines = ["# E3 benchmark report", ""]
    backend = next((r["backend"] for r in configs.values()), None) or (results.get("collider") or {}).get("backend")
    lines += [
        f"- date: {env['date']}; commit {env.get('git_commit')}{' (uncommitted changes)' if env.get('git_dirty') else ''}",
        f"- machine: {env.get('cpu')}, {env.get('cpus_usable')} usable CPUs; {env.get('platform')}; "
        f"Python {env['python']}, NumPy {env['numpy']}, Numba {env['numba']}",
        f"- backend: {backend}; scale {plan['scale']}; {'quick mode (a few steps: not a measurement of quality)' if plan['quick'] else 'full run'}",
        f"- load average (1, 5, 15 min) at start {_loads(env.get('load_average_start'))}, at end {_loads(env.get('load_average_end'))}",
        f"- suite wall time: {results.get('wall_seconds', float('nan')) / 60:.1f} min",
    ]
    if results.get("command"):
        lines.append(f"- command: `{results['command']}`")
    lines += ["", "## Claims", "", "| claim (system we replace) | our target | measured | verdict |", "|---|---|---|---|"]
    for c in a["claims"]:
        lines.append(f"| {c['claim']} | {c['target']} | {c['measured']} | {c['verdict']} |")
    if configs:
        lines += _config_section(results, a, plots)
    if results.get("collider"):
        lines += _collider_section(results["collider"], plots)
    if results.get("loader"):
        lines += _loader_section(results["loader"])
    lines += _notes(results)
    return "\n".join(lines) + "\n"


def _loads(v):
    return "n/a" if not v else ", ".join(f"{x:.2f}" for x in v)


def _config_section(results, a, plots):
    configs = results["configs"]
    any_cfg = next(iter(configs.values()))
    m = any_cfg["model"]
    lines = ["", "## Training runs", ""]
    lines.append(
        f"Model: dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads, FFN {m['ffn_hidden']}, "
        f"context {m['seq_len']}, vocabulary {m['vocab_size']}. Each run: {any_cfg['steps']} steps of "
        f"{any_cfg['tokens_per_step']:,} tokens ({any_cfg['tokens']:,} tokens); timing averages leave out the first "
        f"{results['plan']['warmup_steps']} steps.")
    lines += ["", "| config | params | final val CE | vs baseline | tokens to baseline's final CE | tokens/s | step ms "
              "| forward | backward | optimizer | data wait | hidden opt. state | vs fp32 Muon | all opt. state "
              "| peak RSS | GPU pool |", "|" + "---|" * 16]
    for name, r in configs.items():
        d = a["configs"][name]
        t = r["timing"]
        st = r["optimizer_state_bytes"]
        reach = d.get("tokens_to_baseline_loss")
        reach_s = "not reached" if reach is None and "tokens_ratio" in d else (
            f"{reach:,.0f} ({d['tokens_ratio']:.3f}x)" if reach is not None and d.get("tokens_ratio") else "n/a")
        delta = f"{100 * d['val_loss_delta']:+.2f}%" if "val_loss_delta" in d else "n/a"
        share = (lambda x: f"{_ms(x)} ({_pct(x / t['total'])})") if t["total"] > 0 else _ms
        lines.append(
            f"| {name} | {r['model']['parameters']:,} | {r['final_val_loss']:.4f} | {delta} | {reach_s} | "
            f"{r['tokens_per_sec']:,.0f} | {_ms(t['total'])} | {share(t['forward'])} | {share(t['backward'])} | "
            f"{share(t['optimizer'])} | {share(t['data_wait'])} | {_mib(st['hidden'])} | "
            f"{d['hidden_state_ratio']:.3f}x | {_mib(st['total'])} | {_mib(r['peak_rss_bytes'])} | {_mib(r['gpu_pool_bytes'])} |")
    lines += ["", "Validation CE is the main next-token loss only (MTP heads excluded), on the same fixed "
              "validation windows for every run. 'vs fp32 Muon' divides the hidden-matrix (Muon group) state by "
              "the measured state of a plain float32 Muon over the same matrices; 'all opt. state' adds the AdamW "
              "groups (embedding, norms). Skipped non-finite steps: "
              + ", ".join(f"{n} {r['skipped_steps']}" for n, r in configs.items()) + "."]
    names = sorted({k for r in configs.values() for k in r["optimizer_state_bytes"].get("hidden_by_array", {})})
    if names:
        lines += ["", "Hidden-matrix optimizer state by array (`buf`: float momentum, `qbuf`/`scales`: int8 momentum "
                  "and its block scales, `P`: GaLore projectors, `step`: step counters):", "",
                  "| config | " + " | ".join(names) + " | total |", "|" + "---|" * (len(names) + 2)]
        for name, r in configs.items():
            by = r["optimizer_state_bytes"]["hidden_by_array"]
            lines.append(f"| {name} | " + " | ".join(_mib(by[k]) if k in by else "-" for k in names)
                         + f" | {_mib(r['optimizer_state_bytes']['hidden'])} |")
    for key, title in (("val_loss", "Validation loss vs tokens"), ("step_time", "Time per step")):
        if key in plots:
            lines += ["", f"![{title}]({plots[key]})"]
    return lines


def _collider_section(col, plots):
    med = col["median"]
    lines = ["", "## Collider micro-benchmark", ""]
    lines.append(
        f"e3_baseline model, {col['tokens_per_batch']:,} tokens per batch, {100 * col['sparsity']:g}% of each sequence "
        f"filtered (kept fraction {col['kept_fraction']:.3f}), {col['reps']} repetitions per mode on the same batches "
        f"(medians, range in brackets), backend {col['backend']}.")
    lines += ["", "| | dense | filtered | ratio of medians |", "|---|---|---|---|"]
    for k in ("forward", "backward"):
        cells = [f"{_ms(med[m][k])} [{_ms(min(col['times'][m][k]))}-{_ms(max(col['times'][m][k]))}]" for m in ("dense", "sparse")]
        lines.append(f"| {k} ms | {cells[0]} | {cells[1]} | {med['sparse'][k] / med['dense'][k]:.3f}x |")
    prof = col["profile"]
    cats = sorted(set(prof["dense"]) | set(prof["sparse"]), key=lambda c: -prof["dense"].get(c, 0.0))
    dense_total = sum(prof["dense"].values())
    lines += ["", f"Backward split by op (median over {col['profile_reps']} profiled pass(es) per mode; each op's "
              "backward timed on its own, device-synchronised):", "",
              "| op | dense ms | share of dense | filtered ms | ratio |", "|---|---|---|---|---|"]
    for c in cats:
        dv, sv = prof["dense"].get(c, 0.0), prof["sparse"].get(c, 0.0)
        ratio = f"{sv / dv:.3f}x" if dv > 0 else "n/a"
        lines.append(f"| {c} | {_ms(dv)} | {_pct(dv / dense_total) if dense_total else 'n/a'} | {_ms(sv)} | {ratio} |")
    filtered = list(_OP_CATEGORIES.values())  # the ops whose backward runs on the kept rows only
    ms_of = {m: sum(prof[m].get(c, 0.0) for c in filtered) for m in ("dense", "sparse")}
    rest_d = dense_total - ms_of["dense"]
    rest_s = sum(prof["sparse"].values()) - ms_of["sparse"]
    lines += ["", f"Only the BitLinear and LM-head backwards run on the kept rows: together they go from "
              f"{_ms(ms_of['dense'])} ms to {_ms(ms_of['sparse'])} ms, while every other op (attention, norms, the "
              f"embedding gather, cross-entropy) stays dense: {_ms(rest_d)} ms vs {_ms(rest_s)} ms."]
    if "collider" in plots:
        lines += ["", f"![Collider backward split]({plots['collider']})"]
    return lines


def _loader_section(lo):
    lines = ["", "## Data loader micro-benchmark", ""]
    lines.append(f"e3_baseline training steps, {lo['steps']} timed steps per loader after one warm-up step; async loader "
                 f"with {lo['workers']} worker(s) and {lo['prefetch']} batches of prefetch. Building one batch from the "
                 f"token memmap takes {1e6 * lo['batch_build_seconds']:.1f} us.")
    lines += ["", "| loader | data wait ms/step | step ms | data-wait fraction |", "|---|---|---|---|"]
    for mode in ("sync", "async"):
        r = lo[mode]
        lines.append(f"| {mode} | {_ms(r['data_wait_seconds'] / lo['steps'])} | {_ms(r['step_seconds'] / lo['steps'])} | "
                     f"{100 * r['data_wait_fraction']:.3f}% |")
    return lines


def _notes(results):
    return ["", "## How each number is measured", "",
            "- Every run trains the same model from the same initialisation on the same batches; only the preset's "
            "optimizer and MTP settings differ. "
            + ("This run used --in-process: every part ran in one process, so peak RSS is cumulative."
               if results["plan"].get("in_process") else "Each training run and micro-benchmark runs in a fresh process."),
            "- Step time split: wall-clock seconds of the trainer's phases (data wait, forward, backward, optimizer "
            "including clipping), device-synchronised; tokens/s = tokens per step / mean step time.",
            "- Optimizer state: the sum of `nbytes` of every state array (moments, int8 buffers and scales, GaLore "
            "projectors, step counters) after training. The float32 Muon reference is a plain Muon allocated over "
            "matrices of the same shapes and stepped once, then measured the same way.",
            "- Tokens to the baseline's final CE: the first point where a run's validation curve reaches that value, "
            "interpolated linearly between evaluations; the ratio divides by the baseline's own tokens to it.",
            "- Peak RSS: the process's `ru_maxrss` at the end of training. GPU pool: bytes held by CuPy's memory "
            "pool at the end of training (the pool keeps freed blocks, so this is its high-water mark).",
            "- Method and design notes: docs/e3.md."]


def write_plots(results, out_dir):
    """PNG plots next to the report; returns {key: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    plots = {}
    configs = results.get("configs", {})
    if configs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, r in configs.items():
            curve = np.asarray([(tok, v) for _, tok, v in r["val_curve"]], dtype=float)
            ax.plot(curve[:, 0], curve[:, 1], marker="o", markersize=3, label=name)
        if BASELINE in configs:
            ax.axhline(configs[BASELINE]["final_val_loss"], color="gray", linestyle="--", linewidth=0.8,
                       label="baseline final")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation CE (main head)")
        ax.set_title("E3: validation loss vs tokens")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "e3_val_loss.png", dpi=120)
        plt.close(fig)
        plots["val_loss"] = "e3_val_loss.png"

        fig, ax = plt.subplots(figsize=(7, 0.6 * len(configs) + 1.5))
        names = list(configs)
        left = np.zeros(len(names))
        parts = ("forward", "backward", "optimizer", "data_wait")
        for part in parts + ("other",):
            if part == "other":
                vals = np.array([max(0.0, configs[n]["timing"]["total"] - sum(configs[n]["timing"][p] for p in parts))
                                 for n in names])
            else:
                vals = np.array([configs[n]["timing"][part] for n in names])
            ax.barh(names, 1000 * vals, left=1000 * left, label=part.replace("_", " "))
            left += vals
        ax.invert_yaxis()
        ax.set_xlabel("ms per step")
        ax.set_title("E3: time split per step")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "e3_step_time.png", dpi=120)
        plt.close(fig)
        plots["step_time"] = "e3_step_time.png"
    col = results.get("collider")
    if col:
        prof = col["profile"]
        cats = sorted(set(prof["dense"]) | set(prof["sparse"]), key=lambda c: -prof["dense"].get(c, 0.0))[:10]
        y = np.arange(len(cats))
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(cats) + 1.5))
        ax.barh(y - 0.2, [1000 * prof["dense"].get(c, 0.0) for c in cats], height=0.4, label="dense")
        ax.barh(y + 0.2, [1000 * prof["sparse"].get(c, 0.0) for c in cats], height=0.4,
                label=f"{100 * col['sparsity']:g}% filtered")
        ax.set_yticks(y, cats)
        ax.invert_yaxis()
        ax.set_xlabel(f"backward ms (median of {col['profile_reps']} profiled pass(es))")
        ax.set_title("Collider: backward time by op")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "e3_collider.png", dpi=120)
        plt.close(fig)
        plots["collider"] = "e3_collider.png"
    return plots


# ------------------------------------------------------------------------------------ CLI


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m nanochat.bench", description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    sys.exit(main())
