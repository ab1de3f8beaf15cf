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

from nanochat.train.losses import compute_loss

E3_PRESETS = ("e3_baseline", "e3_mtp_only", "e3_muon_8bit", "e3_galore2", "e3_full")
MICRO_BENCHMARKS = ("collider", "loader")
BASELINE = "e3_baseline"
RESULTS_FILE = "results.json"
REPORT_FILE = "REPORT.md"
RESULTS_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[2]

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


class _Recorder:
    """Trainer callbacks: per-step phase times and losses, the validation curve, evaluation time."""

    def __init__(self, preset, steps):
        self.preset, self.steps = preset, steps
        self.step_times, self.train_curve, self.val_curve, self.eval_seconds = [], [], [], 0.0

    def on_step(self, trainer, rec, times):
        self.step_times.append([getattr(times, f) for f in TIME_FIELDS])
        self.train_curve.append([trainer.state.step, rec["loss"], rec["ce"], rec["mtp"]])

    def on_eval(self, trainer, step, val_loss, seconds):
        self.val_curve.append([step, trainer.state.tokens, val_loss])
        if step:
            self.eval_seconds += seconds
            _log(f"{self.preset}: step {step}/{self.steps}, validation CE {val_loss:.4f}")


def run_config(plan, preset, out_dir):
    """Train one preset for its steps; measure losses, timing, optimizer state and memory."""
    from nanochat.train.trainer import Trainer

    cfg = load_plan_config(plan, preset)
    data = load_data(cfg)
    trainer = Trainer(cfg, out_dir=Path(out_dir) / "runs" / preset, progress=False, data=data)
    be, t = trainer.be, cfg.train
    tokens_per_step = t.batch_size * cfg.model.seq_len * t.grad_accum
    rec = _Recorder(preset, t.steps)
    t_start = time.perf_counter()
    trainer.train(callbacks=[rec])  # the trainer's own loop; the recorder measures each step and evaluation
    step_times, train_curve, val_curve, eval_seconds = rec.step_times, rec.train_curve, rec.val_curve, rec.eval_seconds
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
    from nanochat.bench.report import write_report

    write_report(results, out_dir)
    return results


def _write_json(path, value):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)
