"""Train a ternary LM: ``python -m nanochat.train [--config PRESET|file.toml] [--backend ...] ...``.

With no arguments it trains the ``tiny`` preset on the Python standard library's sources,
then prints a generated sample and where the checkpoint, metrics and plot are.
``python -m nanochat.train plot RUN_DIR`` redraws a run's loss curve.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

import backends
from reference.autograd import no_grad
from reference import optim as ref_optim

from .checkpoint import CheckpointError, load_checkpoint, rng_from_json, rng_state_to_json, save_checkpoint
from .config import Config, ConfigError, available_presets, load_config
from .metrics import MetricsLogger, plot_losses
from .model import Model, is_muon_param


class TrainingError(RuntimeError):
    """A run that cannot go on (for example too many non-finite steps in a row)."""


@dataclass
class StepTimes:
    """Seconds spent per phase, summed over the steps of a logging window."""

    forward: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0
    data_wait: float = 0.0
    total: float = 0.0

    def add(self, other):
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    nonfinite_in_row: int = 0
    skipped: int = 0
    history: list = field(default_factory=list)


def build_optimizers(model, cfg: Config):
    """Muon (or 8-bit Muon / GaLore) for hidden matrices, AdamW/Lion for the rest (SPEC 4).

    Returns a list of (name, optimizer, base_lr) so the schedule scales each group's rate.
    """
    o = cfg.optim
    be = model.be
    hidden, embed, head, other = [], [], [], []
    for name, p in model.params.items():
        if is_muon_param(name, p.shape):
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
                min_dim=o.galore_min_dim, oversample=o.galore_oversample, power_iters=o.galore_power_iters,
                seed=cfg.train.seed, **inner_kwargs,
            )
            groups.append(("hidden", opt, o.muon_lr if o.galore_inner == "muon" else o.adamw_lr))
        else:
            groups.append(("hidden", ref_optim.Muon(hidden, o.muon_lr, **muon_kwargs), o.muon_lr))
    for label, params, lr in (("embedding", embed, o.embedding_lr), ("head", head, o.head_lr), ("scalars", other, o.adamw_lr)):
        if not params:
            continue
        if o.scalar_optimizer == "lion":
            opt = ref_optim.Lion(params, lr, betas=tuple(o.lion_betas), weight_decay=o.adamw_weight_decay, kernels=be)
        else:
            opt = ref_optim.AdamW(params, lr, betas=tuple(o.adamw_betas), eps=o.adamw_eps,
                                  weight_decay=o.adamw_weight_decay, kernels=be)
        groups.append((label, opt, lr))
    return groups


def lr_multiplier(step, cfg: Config):
    o = cfg.optim
    return ref_optim.wsd_lr(step, cfg.train.steps, 1.0, o.warmup_steps, o.decay_frac, o.min_lr_ratio, decay=o.decay)


class Trainer:
    """One training run: data, model, optimizers, loop, logs and checkpoints."""

    def __init__(self, cfg: Config, out_dir=None, resume=None, progress=True, data=None):
        self.cfg = cfg
        self.progress = progress
        self.be = backends.get_backend(cfg.train.backend)
        self.out_dir = Path(out_dir or cfg.train.out_dir or default_out_dir())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.data = data if data is not None else self._prepare_data()
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {cfg.model.vocab_size} is smaller than the data's vocabulary "
                f"({self.data.vocab_size} tokens); raise model.vocab_size"
            )
        self.model = Model(cfg.model, self.be, seed=cfg.train.seed)
        self.optimizers = build_optimizers(self.model, cfg)
        self.state = TrainState()
        self.rng = np.random.default_rng(cfg.train.seed + 1)
        if resume is not None:
            self._restore(resume)

    # --------------------------------------------------------------- set-up
    def _prepare_data(self):
        from .data import prepare_data

        d = self.cfg.data
        return prepare_data(d.path or None, vocab_size=self.cfg.model.vocab_size, cache_dir=d.cache_dir or None,
                            progress=self.progress, val_fraction=d.val_fraction,
                            tokenizer_train_bytes=d.tokenizer_train_bytes)

    def _make_loader(self):
        from .loader import AsyncLoader, BatchLoader

        t = self.cfg.train
        args = (self.data.train_tokens, t.batch_size, self.cfg.model.seq_len, t.seed)
        start = self.state.step * t.grad_accum
        if t.async_loader:
            return AsyncLoader(*args, start_step=start, workers=t.loader_workers, prefetch=t.loader_prefetch)
        return BatchLoader(*args, start_step=start)

    def _restore(self, path):
        ck = load_checkpoint(path)
        params = ck["params"]
        missing = sorted(set(self.model.params) - set(params))
        extra = sorted(set(params) - set(self.model.params))
        if missing or extra:
            raise CheckpointError(
                f"{ck['path']}: parameters do not match the model (missing {missing[:3]}, unexpected {extra[:3]})"
            )
        for name, p in self.model.params.items():
            a = params[name]
            if a.shape != p.shape:
                raise CheckpointError(f"{ck['path']}: parameter {name} has shape {a.shape}, the model expects {p.shape}")
            p.data = self.be.asarray(a.astype(self.model.dtype, copy=False))
        for label, opt, _ in self.optimizers:
            prefix = label + "/"
            opt.load_state_dict({k[len(prefix):]: v for k, v in ck["optimizer"].items() if k.startswith(prefix)})
        s = ck["state"]
        self.state.step = int(s["step"])
        self.state.tokens = int(s["tokens"])
        self.rng = rng_from_json(s["rng"])

    # ------------------------------------------------------------ one step
    def train_step(self, loader):
        """Forward/backward over ``grad_accum`` micro-batches, clip, update. Returns a metrics dict."""
        cfg, be, model = self.cfg, self.be, self.model
        times = StepTimes()
        t_start = time.perf_counter()
        accum = cfg.train.grad_accum
        loss_sum = ce_sum = mtp_sum = aux_sum = 0.0
        loads = []
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = next(loader)
            t1 = time.perf_counter()
            res = model.forward(batch, collider_sparsity=cfg.train.collider_sparsity)
            be.synchronize()
            t2 = time.perf_counter()
            (res.loss * (1.0 / accum)).backward()
            be.synchronize()
            t3 = time.perf_counter()
            times.data_wait += t1 - t0
            times.forward += t2 - t1
            times.backward += t3 - t2
            loss_sum += float(res.loss.data)
            ce_sum += res.ce
            mtp_sum += res.mtp
            aux_sum += res.aux
            loads = res.expert_load or loads
        t4 = time.perf_counter()
        params = list(model.params.values())
        grads = [p.grad for p in params]
        clip = cfg.optim.grad_clip
        if clip > 0:
            grad_norm = float(be.clip_by_global_norm(grads, clip))
        else:
            grad_norm = float(be.global_grad_norm(grads))
        loss = loss_sum / accum
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        mult = lr_multiplier(self.state.step, cfg)
        if finite:
            for _, opt, base in self.optimizers:
                opt.lr = base * mult
                opt.step()
        for p in params:
            p.grad = None
        be.synchronize()
        times.optimizer += time.perf_counter() - t4
        times.total = time.perf_counter() - t_start
        record = {
            "loss": loss, "ce": ce_sum / accum, "mtp": mtp_sum / accum, "moe_aux": aux_sum / accum,
            "grad_norm": grad_norm, "lr": cfg.optim.muon_lr * mult, "lr_multiplier": mult,
            "finite": finite, "times": times, "expert_load": [list(map(int, l)) for l in loads],
        }
        if model.last_h_res:
            record["composite_gain"] = float(be.composite_gain(model.last_h_res))
        return record

    def evaluate(self, max_batches=None):
        """Mean validation CE (main next-token loss) over fixed validation windows."""
        from .loader import val_batches

        t = self.cfg.train
        losses = []
        with no_grad():
            for batch in val_batches(self.data.val_tokens, t.batch_size, self.cfg.model.seq_len,
                                     max_batches or t.eval_batches):
                losses.append(self.model.forward(batch).ce)
        return float(np.mean(losses)) if losses else float("nan")

    # ------------------------------------------------------------------ loop
    def train(self):
        cfg, t = self.cfg, self.cfg.train
        logger = MetricsLogger(self.out_dir, tensorboard=t.tensorboard)
        tokens_per_step = t.batch_size * cfg.model.seq_len * t.grad_accum
        loader = self._make_loader()
        window = StepTimes()
        window_steps = 0
        interrupted = False
        bar = _progress_bar(t.steps, self.state.step, disable=not self.progress)
        try:
            if self.state.step == 0:
                v0 = self.evaluate()
                logger.log({"kind": "val", "step": 0, "tokens": 0, "val_loss": v0})
                self.state.history.append((0, v0))
            while self.state.step < t.steps:
                rec = self.train_step(loader)
                times = rec.pop("times")
                if not rec["finite"]:
                    self.state.nonfinite_in_row += 1
                    self.state.skipped += 1
                    logger.log({"kind": "skip", "step": self.state.step, "loss": rec["loss"], "grad_norm": rec["grad_norm"]})
                    if self.state.nonfinite_in_row >= t.max_nonfinite_steps:
                        raise TrainingError(
                            f"stopping at step {self.state.step}: {self.state.nonfinite_in_row} steps in a row had a "
                            f"non-finite loss or gradient (last loss {rec['loss']}, grad norm {rec['grad_norm']}); "
                            f"lower the learning rate or check the data"
                        )
                    continue
                self.state.nonfinite_in_row = 0
                self.state.step += 1
                self.state.tokens += tokens_per_step
                window.add(times)
                window_steps += 1
                wait = getattr(loader, "wait_seconds", None)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['ce']:.3f}", lr=f"{rec['lr']:.2e}",
                                tok_s=f"{tokens_per_step / max(times.total, 1e-9):,.0f}")
                step = self.state.step
                if step % t.log_every == 0 or step == t.steps:
                    logger.log({
                        "kind": "train", "step": step, "tokens": self.state.tokens, **rec,
                        "tokens_per_sec": tokens_per_step * window_steps / max(window.total, 1e-9),
                        "data_wait_frac": window.data_wait / max(window.total, 1e-9),
                        "time_forward": window.forward / window_steps, "time_backward": window.backward / window_steps,
                        "time_optimizer": window.optimizer / window_steps, "time_data_wait": window.data_wait / window_steps,
                        "time_step": window.total / window_steps, "loader_wait_total": wait,
                    })
                    window, window_steps = StepTimes(), 0
                if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                    v = self.evaluate()
                    self.state.history.append((step, v))
                    logger.log({"kind": "val", "step": step, "tokens": self.state.tokens, "val_loss": v})
                    bar.write(f"step {step}: validation loss {v:.4f}")
                if t.checkpoint_every and step % t.checkpoint_every == 0 and step != t.steps:
                    self.save()
        except KeyboardInterrupt:
            interrupted = True
            bar.write("interrupted: saving a checkpoint before exiting")
        finally:
            bar.close()
            if hasattr(loader, "close"):
                loader.close()
        ckpt = self.save()
        logger.close()
        plot = plot_losses(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png",
                           title=f"{cfg.model.dim}d x {cfg.model.n_layers} layers, {self.be.name} backend")
        return {"checkpoint": ckpt, "metrics": logger.path, "plot": plot, "tensorboard": logger.tb_dir,
                "interrupted": interrupted, "history": self.state.history}

    def save(self):
        params = {name: self.be.to_numpy(p.data) for name, p in self.model.params.items()}
        opt_state = {}
        for label, opt, _ in self.optimizers:
            opt_state.update({f"{label}/{k}": np.asarray(v) for k, v in opt.state_dict().items()})
        state = {"step": self.state.step, "tokens": self.state.tokens, "rng": rng_state_to_json(self.rng),
                 "backend": self.be.name, "val_history": self.state.history, "skipped_steps": self.state.skipped}
        tok_path = getattr(self.data, "tokenizer_path", None)
        return save_checkpoint(self.out_dir / "checkpoints", self.state.step, params, opt_state,
                               self.cfg.to_toml(), state, tokenizer_path=tok_path, keep_last=self.cfg.train.keep_last_k)

    def sample(self, prompt, max_tokens, temperature=0.8, top_k=40):
        from .sample import generate

        tok = self.data.tokenizer
        ids = tok.encode(prompt)
        out = generate(self.model, ids, max_tokens, temperature=temperature, top_k=top_k, rng=self.rng,
                       stop_id=tok.eot_id)
        return prompt + tok.decode(out)


def default_out_dir():
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def _progress_bar(total, initial, disable):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disable, dynamic_ncols=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m nanochat.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help=f"preset name ({', '.join(available_presets())}) or a .toml file")
    p.add_argument("--backend", default=None, choices=["auto", "numpy", "numba", "cupy"])
    p.add_argument("--data", default=None, help="text file, directory of text files, or pre-tokenized .bin")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.dim=512 (repeatable)")
    p.add_argument("--resume", default=None, help="checkpoint directory (or run directory) to resume from")
    p.add_argument("--out", default=None, help="run directory (default runs/<timestamp>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def resolve_config(args):
    overrides = list(args.overrides)
    if args.backend:
        overrides.append(f"train.backend={args.backend}")
    if args.data:
        overrides.append(f'data.path="{Path(args.data).as_posix()}"')
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.resume and not args.config:
        ck_dir = Path(args.resume)
        if not ck_dir.exists():
            raise CheckpointError(f"{ck_dir}: checkpoint directory does not exist")
        ck = load_checkpoint(ck_dir)
        saved = ck["path"] / "config.toml"
        return load_config(str(saved), overrides)
    return load_config(args.config, overrides)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        trainer = Trainer(cfg, out_dir=args.out, resume=args.resume, progress=not args.quiet)
    except (ConfigError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = trainer.model
    print(f"backend: {trainer.be.name} ({trainer.be.description}); out: {trainer.out_dir}")
    print(f"model: {m.num_parameters():,} parameters ("
          + ", ".join(f"{k} {v:,}" for k, v in sorted(m.parameter_breakdown().items())) + ")")
    print(f"data: {len(trainer.data.train_tokens):,} train tokens, {len(trainer.data.val_tokens):,} val tokens; "
          f"{cfg.train.steps} steps x {cfg.train.batch_size * cfg.model.seq_len * cfg.train.grad_accum:,} tokens")
    try:
        result = trainer.train()
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    hist = result["history"]
    if len(hist) >= 2:
        print(f"validation loss: {hist[0][1]:.4f} at step {hist[0][0]} -> {hist[-1][1]:.4f} at step {hist[-1][0]}")
    if cfg.train.sample_tokens and not result["interrupted"]:
        text = trainer.sample(cfg.train.sample_prompt, cfg.train.sample_tokens, cfg.train.sample_temperature)
        print("\n--- sample " + "-" * 50 + "\n" + text + "\n" + "-" * 61)
    print(f"checkpoint:  {result['checkpoint']}")
    print(f"metrics:     {result['metrics']}")
    if result["tensorboard"]:
        print(f"tensorboard: tensorboard --logdir {result['tensorboard']}")
    print(f"loss plot:   {result['plot']}")
    return 130 if result["interrupted"] else 0


def plot_main(argv):
    p = argparse.ArgumentParser(prog="python -m nanochat.train plot", description="draw a run's loss curve")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    a = p.parse_args(argv)
    run = Path(a.run_dir)
    if not (run / "metrics.jsonl").exists():
        print(f"error: {run}: no metrics.jsonl in this directory", file=sys.stderr)
        return 2
    png = plot_losses(run / "metrics.jsonl", a.out or run / "loss.png", title=run.name)
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
