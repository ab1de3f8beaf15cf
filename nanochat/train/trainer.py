"""Train a ternary LM: ``python -m nanochat.train [--config PRESET|file.toml] [--backend ...] ...``.

With no arguments it trains the ``tiny`` preset on the Python standard library's sources,
then prints a generated sample and where the checkpoint, metrics and plot are.
``python -m nanochat.train plot RUN_DIR`` redraws a run's loss curve.

Exit codes: 0 done, 2 bad configuration/checkpoint/data, 3 training stopped (non-finite
steps), 130 interrupted with Ctrl-C (after saving a checkpoint).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

import backends
from backends import threads
from reference.autograd import no_grad
from reference import optim as ref_optim

from nanochat.io.checkpoint import (CheckpointError, check_optimizer_coverage, find_nonfinite, load_checkpoint,
                                    rng_from_json, rng_state_to_json, save_checkpoint)
from nanochat.config import Config, ConfigError
from nanochat.train.budget import check_memory
from nanochat.train.metrics import MetricsLogger, plot_losses, run_title
from nanochat.train.schedule import resumed_schedule, trained_schedule_steps
from nanochat.model.gpt import Model
from nanochat.train.losses import compute_loss
from nanochat.train.ranks import StopFlag
from nanochat.train import distributed
from nanochat.train import ranks


class TrainingError(RuntimeError):
    """A run that cannot go on (for example too many non-finite steps in a row)."""


@dataclass
class StepTimes:
    """Seconds spent per phase, summed over the steps of a logging window."""

    forward: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0
    data_wait: float = 0.0
    comm: float = 0.0          # data-parallel collectives (gradient reduce, norm, weight broadcast)
    total: float = 0.0

    def add(self, other):
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class TrainState:
    """What a checkpoint must carry besides weights and optimizer state to resume bit-exactly."""

    step: int = 0              # optimizer updates applied
    tokens: int = 0            # training tokens behind those updates
    data_step: int = 0         # micro-batches consumed (applied or skipped): the data cursor
    nonfinite_in_row: int = 0
    skipped: int = 0
    history: list = field(default_factory=list)  # (step, validation loss)
    schedule_steps: int = 0    # length of the learning-rate schedule; 0 = train.steps (nanochat/train/schedule.py)


def build_optimizers(model, cfg: Config):
    """Muon (or 8-bit Muon / GaLore) for hidden matrices, AdamW/Lion for the rest (SPEC 4).

    Returns a list of (name, optimizer, base_lr) so the schedule scales each group's rate.
    """
    o = cfg.optim
    be = model.be
    hidden, embed, head, other = [], [], [], []
    groups = model.param_groups()
    for name, p in model.params.items():
        if groups[name] == "muon":
            hidden.append(p)
        elif name == "tok_embeddings":
            embed.append(p)
        elif name == "lm_head":
            head.append(p)
        else:
            other.append(p)
    muon_kwargs = dict(
        momentum=o.muon_momentum, nesterov=o.muon_nesterov, ns_steps=o.muon_ns_steps,
        weight_decay=o.muon_weight_decay, adjust_lr=o.muon_adjust_lr, polar_express=o.muon_polar_express,
        eightbit=o.muon_8bit, kernels=be,
    )
    groups = []
    if hidden:
        if o.galore:
            inner_kwargs = muon_kwargs if o.galore_inner == "muon" else dict(
                betas=tuple(o.adamw_betas), eps=o.adamw_eps, weight_decay=o.adamw_weight_decay, kernels=be)
            opt = ref_optim.GaLore(
                hidden, o.muon_lr if o.galore_inner == "muon" else o.adamw_lr, inner=o.galore_inner,
                rank=o.galore_rank, update_freq=o.galore_update_freq, scale=o.galore_scale,
                min_dim=o.galore_min_dim, oversample=o.galore_oversample, power_iters=o.galore_power_iters, projector_dtype=o.galore_projector_dtype,
                seed=cfg.train.seed, **inner_kwargs,
            )
            groups.append(("hidden", opt, o.muon_lr if o.galore_inner == "muon" else o.adamw_lr))
        else:
            groups.append(("hidden", ref_optim.Muon(hidden, o.muon_lr, **muon_kwargs), o.muon_lr))
    for label, params, lr in (("embedding", embed, o.embedding_lr), ("head", head, o.head_lr), ("scalars", other, o.adamw_lr)):
        if not params:
            continue
        if o.scalar_optimizer == "lion":
            lr = lr * o.lion_lr_scale  # Lion's own rates: a fraction of AdamW's (docs/config.md)
            opt = ref_optim.Lion(params, lr, betas=tuple(o.lion_betas), weight_decay=o.adamw_weight_decay, kernels=be)
        else:
            opt = ref_optim.AdamW(params, lr, betas=tuple(o.adamw_betas), eps=o.adamw_eps,
                                  weight_decay=o.adamw_weight_decay, kernels=be)
        groups.append((label, opt, lr))
    return groups


def _notify(callbacks, event, *args):
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is not None:
            fn(*args)


def lr_multiplier(step, cfg: Config, schedule_steps=0):
    """Factor on every group's base rate at ``step``: warmup-stable-decay over ``schedule_steps``
    (``train.steps`` when 0; a resumed run may keep the schedule it was trained under)."""
    o = cfg.optim
    total = schedule_steps or cfg.train.steps
    return ref_optim.wsd_lr(step, total, 1.0, o.warmup_steps, o.decay_frac, o.min_lr_ratio, decay=o.decay)


def backend_for(cfg: Config):
    """The configured backend, switched to ``train.dtype`` when that differs from its default."""
    be = backends.get_backend(cfg.train.backend)
    dtype = np.dtype(cfg.train.dtype)
    if be.dtype != dtype:
        be = copy.copy(be)  # the registry caches one instance per name: never mutate it
        be.dtype = dtype
        be.description = f"{be.description}, {dtype.name} parameters"
    return be


class Trainer:
    """One training run: data, model, optimizers, loop, logs and checkpoints.

    ``resume`` is a checkpoint directory, a run directory (its newest checkpoint) or the dict
    ``load_checkpoint`` returned. ``data`` replaces the corpus: any object with
    ``train_tokens``, ``val_tokens`` (1-D int arrays), ``vocab_size``, ``tokenizer`` and
    ``tokenizer_path`` (both may be None).
    """

    def __init__(self, cfg: Config, out_dir=None, resume=None, progress=True, data=None, comm=None):
        self.cfg = cfg
        self.progress = progress
        # Read the checkpoint first: a bad one should fail before minutes of data preparation.
        ck = resume if isinstance(resume, dict) or resume is None else load_checkpoint(resume)
        self.memory = check_memory(cfg)  # a config that cannot fit is one sentence, before any allocation
        self.be = backend_for(cfg)
        # Data parallelism (nanochat/train/distributed.py): one rank unless started by mpiexec.
        self.comm = ranks.for_backend(comm if comm is not None else ranks.communicator(), self.be.name)
        self.out_dir = Path(out_dir or cfg.train.out_dir or default_out_dir())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.data = data if data is not None else self._prepare_data()
        self._check_data()
        self.model = Model(cfg.model, self.be, seed=cfg.train.seed)
        self.optimizers = build_optimizers(self.model, cfg)
        self.dist = distributed.DataParallel(self.model, self.optimizers, self.comm) if self.comm.size > 1 else None
        self.state = TrainState()
        self.rng = np.random.default_rng(cfg.train.seed + 1)
        self._interrupt_requested = False
        self._saved_at = None  # (step, data_step) of the newest checkpoint this trainer wrote
        self.schedule_note = None  # set on resume when train.steps changed: what the learning rate does
        if ck is not None:
            self._restore(ck)
        if self.dist is not None:
            self.dist.bind_params()  # the (restored) weights into the flat buffer
            self.dist.shard_state()  # keep only this rank's share of the optimizer state

    # --------------------------------------------------------------- set-up
    def _prepare_data(self):
        from nanochat.data.corpus import prepare_data

        d = self.cfg.data
        return prepare_data(d.path or None, vocab_size=self.cfg.model.vocab_size, cache_dir=d.cache_dir or None,
                            progress=self.progress, val_fraction=d.val_fraction,
                            tokenizer_train_bytes=d.tokenizer_train_bytes)

    def _check_data(self):
        cfg = self.cfg
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {cfg.model.vocab_size} is smaller than the data's vocabulary "
                f"({self.data.vocab_size} tokens); raise model.vocab_size"
            )
        need = cfg.model.seq_len + 1
        for split in ("train_tokens", "val_tokens"):
            tokens = getattr(self.data, split)
            n = int(getattr(tokens, "size", len(tokens)))
            if n < need:
                raise ValueError(
                    f"the {split.split('_')[0]} split holds {n} tokens, fewer than one window of "
                    f"model.seq_len + 1 = {need}; use more data or a shorter model.seq_len"
                )

    def _make_loader(self):
        from nanochat.data.loader import AsyncLoader, BatchLoader

        t = self.cfg.train
        args = (self.data.train_tokens, t.batch_size, self.cfg.model.seq_len, t.seed)
        start = self.state.data_step
        shard = (self.comm.rank, self.comm.size)  # this rank's rows of every global batch
        if t.async_loader:
            return AsyncLoader(*args, start_step=start, workers=t.loader_workers, prefetch=t.loader_prefetch,
                               shard=shard)
        return BatchLoader(*args, start_step=start, shard=shard)

    def _restore(self, ck):
        path = ck["path"]
        params = ck["params"]
        missing = sorted(set(self.model.params) - set(params))
        extra = sorted(set(params) - set(self.model.params))
        if missing or extra:
            raise CheckpointError(
                f"{path / 'model.safetensors'}: parameters do not match the model "
                f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the checkpoint's own config"
            )
        for name, p in self.model.params.items():
            a = params[name]
            if tuple(a.shape) != tuple(p.shape):
                raise CheckpointError(f"{path / 'model.safetensors'}: parameter {name} has shape {tuple(a.shape)}, "
                                      f"the model expects {tuple(p.shape)}")
        for label, opt, _ in self.optimizers:
            prefix = label + "/"
            try:
                opt.load_state_dict({k[len(prefix):]: v for k, v in ck["optimizer"].items() if k.startswith(prefix)})
            except ValueError as exc:
                raise CheckpointError(f"{path / 'optimizer.safetensors'}: group {label!r}: {exc}") from None
        known = {label + "/" for label, _, _ in self.optimizers}
        stray = sorted(k for k in ck["optimizer"] if k.split("/", 1)[0] + "/" not in known)
        if stray:
            raise CheckpointError(f"{path / 'optimizer.safetensors'}: state {stray[0]!r} belongs to no optimizer group "
                                  f"of this config (was the optimizer changed?)")
        check_optimizer_coverage(path / "optimizer.safetensors", ck["optimizer"],
                                 {label: len(opt.params) for label, opt, _ in self.optimizers}, ck["state"]["step"])
        # Only now, with everything checked, replace the weights (copies: the loaded arrays may be read-only).
        for name, p in self.model.params.items():
            p.data = self.be.asarray(np.array(params[name], dtype=self.model.dtype, copy=True))
        self.model.weights_changed()
        s = ck["state"]
        self.state.step = s["step"]
        self.state.tokens = s["tokens"]
        self.state.data_step = s["data_step"]
        self.state.skipped = s.get("skipped_steps", 0)
        self.state.history = [tuple(h) for h in s.get("val_history", [])]
        self.rng = rng_from_json(s["rng"], where=path / "state.json")
        trained = trained_schedule_steps(s, ck.get("config_toml"), self.cfg.train.steps)
        self.state.schedule_steps, self.schedule_note = resumed_schedule(
            self.state.step, trained, self.cfg.train.steps, self.cfg.optim)
        self._saved_at = (self.state.step, self.state.data_step)

    # ------------------------------------------------------------ one step
    def accumulate_gradients(self, loader):
        """Forward and backward over ``grad_accum`` micro-batches; leaves the mean gradient in ``p.grad``.

        Returns the step's loss numbers and timings (no parameter changes yet).
        """
        cfg, be, model = self.cfg, self.be, self.model
        times = StepTimes()
        accum = cfg.train.grad_accum
        loss_sum = ce_sum = mtp_sum = aux_sum = 0.0
        loads = []
        for p in model.params.values():  # an interrupted earlier step may have left partial sums
            p.grad = None
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = next(loader)
            t1 = time.perf_counter()
            res = compute_loss(model, batch, collider_sparsity=cfg.train.collider_sparsity,
                               moe_counts=None if self.dist is None else self.dist.global_expert_counts)
            be.synchronize()
            t2 = time.perf_counter()
            # Data parallelism: the last micro-batch's backward starts reducing finished buckets.
            hook = self.dist.backward_hook() if self.dist is not None and micro == accum - 1 else None
            (res.loss * (1.0 / accum)).backward(on_leaf_ready=hook)
            be.synchronize()
            t3 = time.perf_counter()
            times.data_wait += t1 - t0
            times.forward += t2 - t1
            times.backward += t3 - t2
            loss_sum += float(be.to_numpy(res.loss.data))
            ce_sum += res.ce
            mtp_sum += res.mtp
            aux_sum += res.aux
            loads = res.expert_load or loads
        record = {
            "loss": loss_sum / accum, "ce": ce_sum / accum, "mtp": mtp_sum / accum, "moe_aux": aux_sum / accum,
            "times": times, "expert_load": [list(map(int, load)) for load in loads],
            "kept_fraction": res.kept_fraction,  # Collider: the same for every micro-batch (floor(s * T) per row)
        }
        if res.h_res:
            record["composite_gain"] = float(be.composite_gain(res.h_res))
        return record

    def apply_update(self, record):
        """Clip, check finiteness, step the optimizers and advance the counters, as one unit.

        A non-finite loss or gradient skips the update (the batch still counts as consumed).
        Ctrl-C is held until the unit is complete and then honoured at the end of the step.
        """
        cfg, be = self.cfg, self.be
        t4 = time.perf_counter()
        params = list(self.model.params.values())
        if self.dist is not None:  # gradients summed onto their owners, loss numbers averaged over ranks
            self.dist.reduce(record)
        grads = [p.grad for p in params]
        clip = cfg.optim.grad_clip
        with StopFlag() as held:  # Ctrl-C is held until the update is whole
            if self.dist is not None:
                grad_norm = self.dist.clip_by_global_norm(clip)
            elif clip > 0:
                grad_norm = float(be.clip_by_global_norm(grads, clip))
            else:
                grad_norm = float(be.global_grad_norm(grads))
            finite = math.isfinite(record["loss"]) and math.isfinite(grad_norm)
            mult = lr_multiplier(self.state.step, cfg, self.state.schedule_steps)
            if finite:
                for _, opt, base in self.optimizers:
                    opt.lr = base * mult
                    opt.step()
                if self.dist is not None:  # owners broadcast their updated weights
                    self.dist.gather_params()
                self.model.weights_changed()
            for p in params:
                p.grad = None
            be.synchronize()
            st = self.state
            st.data_step += cfg.train.grad_accum
            if finite:
                st.step += 1
                st.tokens += cfg.train.batch_size * cfg.model.seq_len * cfg.train.grad_accum * self.comm.size
                st.nonfinite_in_row = 0
            else:
                st.nonfinite_in_row += 1
                st.skipped += 1
        if held.set:
            self._interrupt_requested = True
        if self.dist is not None:  # every rank stops after the same step
            self._interrupt_requested = self.dist.agree(self._interrupt_requested or self.dist.stop_flag.set)
            record["times"].comm += self.dist.comm_seconds
        record["times"].optimizer += time.perf_counter() - t4
        record.update(grad_norm=grad_norm, lr=cfg.optim.muon_lr * mult, lr_multiplier=mult, finite=finite)
        return record

    def train_step(self, loader):
        """One optimizer step (``accumulate_gradients`` then ``apply_update``); returns its metrics."""
        threads.adapt_threads()  # numba and BLAS pools sized to the cores other processes leave (backends/threads.py)
        t_start = time.perf_counter()
        record = self.apply_update(self.accumulate_gradients(loader))
        record["times"].total = time.perf_counter() - t_start
        return record

    def evaluate(self, max_batches=None):
        """Mean validation CE (main next-token loss) over fixed validation windows."""
        from nanochat.data.loader import val_batches

        t = self.cfg.train
        losses = []
        n = self.comm.size  # with data parallelism each rank evaluates its rows of the same windows
        rows = []
        with no_grad():
            for batch in val_batches(self.data.val_tokens, t.batch_size * n, self.cfg.model.seq_len,
                                     max_batches or t.eval_batches):
                part = np.array_split(batch, n)[self.comm.rank] if n > 1 else batch
                losses.append(compute_loss(self.model, part, with_mtp=False).ce if len(part) else 0.0)
                rows.append(len(part))
        if self.dist is not None:
            return self.dist.mean_over_rows(losses, rows)
        return float(np.mean(losses)) if losses else float("nan")

    # ------------------------------------------------------------------ loop
    def train(self, until=None, callbacks=()):
        """Train to ``cfg.train.steps`` (or stop after step ``until``; the schedule still spans the run).

        ``callbacks``: objects with optional ``on_step(trainer, record, times)`` (after each applied
        update) and ``on_eval(trainer, step, val_loss, seconds)`` methods; the E3 benchmark
        measures through them instead of running a loop of its own.

        Returns paths and the validation history; ``interrupted`` is True after Ctrl-C, in which
        case a checkpoint of the last completed step was written. Raises ``TrainingError`` after
        ``max_nonfinite_steps`` non-finite steps in a row (no checkpoint is written then).
        """
        cfg, t = self.cfg, self.cfg.train
        stop = t.steps if until is None else min(int(until), t.steps)
        logger = MetricsLogger(self.out_dir, tensorboard=t.tensorboard) if self.comm.is_main else ranks.NullLogger()
        tokens_per_step = t.batch_size * cfg.model.seq_len * t.grad_accum * self.comm.size  # global
        if self.dist is not None:
            self.dist.stop_flag.__enter__()  # Ctrl-C becomes a flag all ranks agree on each step
        loader = None
        window = StepTimes()
        window_steps = 0
        interrupted = False
        started = time.perf_counter()
        self._interrupt_requested = False
        bar = _progress_bar(t.steps, self.state.step, disable=not self.progress) if self.comm.is_main \
            else ranks.SilentBar()
        try:
            try:
                loader = self._make_loader()
                threads.start_training(self.be, bar.write)  # thread policy; "compiling kernels, first run only"
                if self.state.step == 0 and not self.state.history:
                    e0 = time.perf_counter()
                    v0 = self.evaluate()
                    logger.log({"kind": "val", "step": 0, "tokens": 0, "val_loss": v0})
                    self.state.history.append((0, v0))
                    _notify(callbacks, "on_eval", self, 0, v0, time.perf_counter() - e0)
                while self.state.step < stop:
                    rec = self.train_step(loader)
                    times = rec.pop("times")
                    if not rec["finite"]:
                        logger.log({"kind": "skip", "step": self.state.step, "tokens": self.state.tokens,
                                    "loss": rec["loss"], "grad_norm": rec["grad_norm"],
                                    "nonfinite_in_row": self.state.nonfinite_in_row})
                        bar.write(f"step {self.state.step}: non-finite loss {rec['loss']} or gradient norm "
                                  f"{rec['grad_norm']}; update skipped")
                        if self.state.nonfinite_in_row >= t.max_nonfinite_steps:
                            raise TrainingError(
                                f"stopping at step {self.state.step}: {self.state.nonfinite_in_row} steps in a row had a "
                                f"non-finite loss or gradient (last loss {rec['loss']}, grad norm {rec['grad_norm']}); "
                                f"lower the learning rate or check the data"
                            )
                        if self._interrupt_requested:
                            raise KeyboardInterrupt
                        continue
                    window.add(times)
                    window_steps += 1
                    _notify(callbacks, "on_step", self, rec, times)
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['ce']:.3f}", lr=f"{rec['lr']:.2e}",
                                    tok_s=f"{tokens_per_step / max(times.total, 1e-9):,.0f}")
                    step = self.state.step
                    if step % t.log_every == 0 or step == t.steps or step == stop:
                        logger.log({
                            "kind": "train", "step": step, "tokens": self.state.tokens, **rec,
                            "tokens_per_sec": tokens_per_step * window_steps / max(window.total, 1e-9),
                            "data_wait_frac": window.data_wait / max(window.total, 1e-9),
                            "time_forward": window.forward / window_steps, "time_backward": window.backward / window_steps,
                            "time_optimizer": window.optimizer / window_steps,
                            "time_data_wait": window.data_wait / window_steps,
                            "time_step": window.total / window_steps,
                            **({"time_comm": window.comm / window_steps} if self.dist is not None else {}),
                            "loader_wait_total": getattr(loader, "wait_seconds", None),
                        })
                        window, window_steps = StepTimes(), 0
                    if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                        e0 = time.perf_counter()
                        v = self.evaluate()
                        _notify(callbacks, "on_eval", self, step, v, time.perf_counter() - e0)
                        self.state.history.append((step, v))
                        logger.log({"kind": "val", "step": step, "tokens": self.state.tokens, "val_loss": v})
                        bar.write(f"step {step}: validation loss {v:.4f}")
                    if t.checkpoint_every and step % t.checkpoint_every == 0 and step < stop:
                        self.save()
                    if self._interrupt_requested:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                interrupted = True
                bar.write(f"interrupted at step {self.state.step}: saving a checkpoint before exiting")
            finally:
                bar.close()
                if loader is not None and hasattr(loader, "close"):
                    loader.close()
            ckpt = self.save()
            logger.log({"kind": "summary", "step": self.state.step, "tokens": self.state.tokens,
                        "skipped_steps": self.state.skipped, "interrupted": interrupted,
                        "seconds": time.perf_counter() - started,
                        "val_loss": self.state.history[-1][1] if self.state.history else None})
        finally:
            logger.close()
            if self.dist is not None:
                self.dist.stop_flag.__exit__(None, None, None)
        try:
            plot = None if not self.comm.is_main else plot_losses(logger.path, self.out_dir / "loss.png",
                               title=run_title(self.out_dir))
        except (OSError, ValueError) as exc:  # a finished run must not fail on its picture
            warnings.warn(f"could not draw {self.out_dir / 'loss.png'}: {exc}", stacklevel=2)
            plot = None
        return {"checkpoint": ckpt, "metrics": logger.path, "plot": plot, "tensorboard": logger.tb_dir,
                "interrupted": interrupted, "history": self.state.history, "step": self.state.step}

    def save(self):
        """Write a checkpoint of the current step (refused, with a TrainingError, from non-finite state)."""
        current = self._current_checkpoint()
        unchanged = current is not None and self._saved_at == (self.state.step, self.state.data_step)
        if self.dist is not None:  # rank 0's view of the run directory decides for every rank
            unchanged = self.comm.bcast_object(unchanged)
        if unchanged:
            return current  # nothing changed since this trainer wrote (or resumed from) it
        params = {name: self.be.to_numpy(p.data) for name, p in self.model.params.items()}
        opt_state = {}
        for label, opt, _ in self.optimizers:
            opt_state.update({f"{label}/{k}": np.asarray(v) for k, v in opt.state_dict().items()})
        if self.dist is not None:  # each rank holds its share of the state; rank 0 gathers it and writes
            opt_state = self.dist.gather_state(opt_state)
        bad = find_nonfinite(params) or find_nonfinite(opt_state)
        if self.dist is not None:
            bad = self.comm.bcast_object(bad)
        if bad:
            raise TrainingError(f"not writing a checkpoint at step {self.state.step}: {bad} has non-finite values; "
                                f"the last good checkpoint is still in {self.out_dir / 'checkpoints'}")
        state = {"step": self.state.step, "tokens": self.state.tokens, "data_step": self.state.data_step,
                 "rng": rng_state_to_json(self.rng), "backend": self.be.name,
                 "val_history": self.state.history, "skipped_steps": self.state.skipped,
                 "schedule_steps": self.state.schedule_steps or self.cfg.train.steps}
        if not self.comm.is_main:
            self._saved_at = (self.state.step, self.state.data_step)
            return self.out_dir / "checkpoints" / f"step-{self.state.step:06d}"
        tok_path = getattr(self.data, "tokenizer_path", None)
        path = save_checkpoint(self.out_dir / "checkpoints", self.state.step, params, opt_state,
                               self.cfg.to_toml(), state, tokenizer_path=tok_path, keep_last=self.cfg.train.keep_last_k)
        self._saved_at = (self.state.step, self.state.data_step)
        return path

    def _current_checkpoint(self):
        """This run's checkpoint directory of the current step when it exists (else None)."""
        path = self.out_dir / "checkpoints" / f"step-{self.state.step:06d}"
        return path if (path / "state.json").exists() else None

    def sample(self, prompt, max_tokens, temperature=0.8, top_k=40):
        """Prompt plus a sampled continuation (needs the data's tokenizer)."""
        from nanochat.train.sample import generate

        tok = self.data.tokenizer
        if tok is None:
            raise ValueError("cannot sample: this data has no tokenizer (a .bin without a tokenizer sidecar)")
        ids = tok.encode(prompt)
        out = generate(self.model, ids, max_tokens, temperature=temperature, top_k=top_k, rng=self.rng,
                       stop_id=getattr(tok, "eot_id", None))
        return prompt + tok.decode(out)


def default_out_dir(label=None):
    """``runs/[label-]<timestamp>``, with a numeric suffix when that directory already exists."""
    stem = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / (f"{label}-{stem}" if label else stem)
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _progress_bar(total, initial, disable):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disable, dynamic_ncols=True)
