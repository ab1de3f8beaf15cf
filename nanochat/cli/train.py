"""``python -m nanochat.train``: the training command line (``nanochat.train.trainer`` is the library).

    python -m nanochat.train [--config PRESET|file.toml] [--backend ...] [--data PATH] [--steps N]
                             [--set key=value ...] [--resume RUN] [--out DIR] [--nproc N]
    python -m nanochat.train plot RUN_DIR
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nanochat.cli.common import backend_choices
from nanochat.config import ConfigError, available_presets, load_config
from nanochat.io.checkpoint import CheckpointError, load_checkpoint
from nanochat.model.params import count_parameters
from nanochat.train import ranks
from nanochat.train.budget import describe, describe_time, format_bytes
from nanochat.train.metrics import plot_losses, run_title, tensorboard_hint
from nanochat.train.trainer import Trainer, TrainingError, default_out_dir

def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m nanochat.train",
        description="Train a ternary-weight language model. With no arguments: the tiny preset on the "
                    "Python standard library's sources, a few minutes on a 2-core CPU.",
        epilog="'python -m nanochat.train plot RUN_DIR' redraws a run's loss curve. Exit codes: 0 done, "
               "2 bad config/checkpoint/data, 3 stopped on non-finite steps, 130 interrupted (checkpoint saved).")
    p.add_argument("--config", default=None, help=f"preset name ({', '.join(available_presets())}) or a .toml file")
    p.add_argument("--backend", default=None, choices=backend_choices(),
                   help="op backend (default from the config: auto = cupy with a GPU, else numba)")
    p.add_argument("--data", default=None, help="text file, directory of text files, or pre-tokenized .bin")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides train.steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.dim=512 (repeatable)")
    p.add_argument("--resume", default=None, help="checkpoint directory (or run directory) to resume from")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>-<timestamp>, or the resumed run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run N data-parallel ranks on this machine through the installed mpiexec "
                        "(docs/distributed.md; or start 'mpiexec -n N python -m nanochat.train ...' yourself)")
    return p.parse_args(argv)


def resolve_config(args, checkpoint=None):
    """The run's config: ``--config`` (default tiny), or the checkpoint's own when resuming without one."""
    overrides = list(args.overrides)
    if args.backend:
        overrides.append(f"train.backend={args.backend}")
    if args.data:
        overrides.append(f"data.path={_toml_string(Path(args.data).as_posix())}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if checkpoint is not None and not args.config:
        return load_config(str(checkpoint["path"] / "config.toml"), overrides)
    return load_config(args.config, overrides)


def _toml_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _run_dir_of(checkpoint_path):
    """The run directory holding ``checkpoints/step-N`` (None for a checkpoint stored elsewhere)."""
    parent = Path(checkpoint_path).parent
    return parent.parent if parent.name == "checkpoints" else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    try:
        nproc, argv = ranks.strip_nproc(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if nproc is not None and nproc > 1 and not ranks.launched_by_mpi():
        try:
            return ranks.launch(nproc, argv)
        except (RuntimeError, OSError) as exc:  # no MPI installed, launcher not runnable
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args = parse_args(argv)
    comm = ranks.communicator()
    if comm.size > 1:
        ranks.install_excepthook(comm)  # an exception on any rank aborts all with one line
        if not comm.is_main:
            sys.stdout = open(os.devnull, "w")  # screen output from rank 0 only
    failure = None
    try:
        ck = load_checkpoint(args.resume) if args.resume else None
        cfg = resolve_config(args, ck)
        out = args.out or (_run_dir_of(ck["path"]) if ck else None) or cfg.train.out_dir or \
            default_out_dir(Path(args.config).stem if args.config else "tiny")
        trainer = Trainer(cfg, out_dir=out, resume=ck, progress=not args.quiet, comm=comm)
    except (ConfigError, CheckpointError, ValueError, OSError) as exc:
        failure = exc
    except KeyboardInterrupt:
        print("interrupted before training started", file=sys.stderr)
        return 130
    message, failed = ranks.agree_on_failure(comm, failure)  # every rank stops, one line
    if failed:
        if message:
            print(message, file=sys.stderr)
        return 2
    m = trainer.model
    print(f"backend: {trainer.be.name} ({trainer.be.description}); out: {trainer.out_dir}")
    print(f"model: {m.num_parameters():,} parameters ("
          + ", ".join(f"{k} {v:,}" for k, v in sorted((k, v) for k, v in count_parameters(cfg).items() if v and k != "total")) + ")")
    print(f"memory: estimated {describe(trainer.memory)}; limit {format_bytes(trainer.memory['limit'])}")
    if trainer.be.name != "cupy":
        print(f"time: {describe_time(cfg)}")
    if trainer.dist is not None:
        print(trainer.dist.describe(cfg))
    print(f"data: {len(trainer.data.train_tokens):,} train tokens, {len(trainer.data.val_tokens):,} val tokens; "
          f"{cfg.train.steps} steps x {cfg.train.batch_size * cfg.model.seq_len * cfg.train.grad_accum * comm.size:,} tokens"
          + (f"; resuming at step {trainer.state.step}" if ck else ""))
    if ck:
        same_dir = _run_dir_of(ck["path"]) is not None and \
            Path(_run_dir_of(ck["path"])).resolve() == trainer.out_dir.resolve()
        print(f"resume: writing into the {'same' if same_dir else 'given'} run directory {trainer.out_dir} "
              f"(metrics.jsonl appended to, new checkpoints in its checkpoints/)"
              + ("; --out DIR writes elsewhere" if same_dir else ""))
        if trainer.schedule_note:
            print(trainer.schedule_note)
    try:
        result = trainer.train()
    except TrainingError as exc:
        if comm.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # a second Ctrl-C while the interrupt checkpoint was being written
        print(f"interrupted while saving; the newest complete checkpoint is under {trainer.out_dir / 'checkpoints'}",
              file=sys.stderr)
        return 130
    hist = result["history"]
    if len(hist) >= 2:
        print(f"validation loss: {hist[0][1]:.4f} at step {hist[0][0]} -> {hist[-1][1]:.4f} at step {hist[-1][0]}")
    if cfg.train.sample_tokens and not result["interrupted"] and trainer.data.tokenizer is not None:
        text = trainer.sample(cfg.train.sample_prompt, cfg.train.sample_tokens, cfg.train.sample_temperature)
        print("\n--- sample " + "-" * 50 + "\n" + text + "\n" + "-" * 61)
    print(f"checkpoint:  {result['checkpoint']}")
    print(f"metrics:     {result['metrics']}")
    if result["tensorboard"]:
        print(f"tensorboard: {tensorboard_hint(result['tensorboard'])}")
    if result["plot"]:
        print(f"loss plot:   {result['plot']}")
    if result["interrupted"]:
        print(f"interrupted at step {result['step']}; resume with --resume {trainer.out_dir}")
        return 130
    return 0


def plot_main(argv):
    p = argparse.ArgumentParser(prog="python -m nanochat.train plot", description="draw a run's loss curve")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    a = p.parse_args(argv)
    run = Path(a.run_dir)
    if not (run / "metrics.jsonl").is_file():
        print(f"error: {run}: no metrics.jsonl in this directory", file=sys.stderr)
        return 2
    try:
        png = plot_losses(run / "metrics.jsonl", a.out or run / "loss.png", title=run_title(run))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(png)
    return 0

