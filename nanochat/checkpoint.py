"""Checkpoints: a directory per step, written atomically, the last k kept.

Layout of ``OUT/checkpoints/step-000400/``:
- ``model.safetensors``      parameters by name (float32)
- ``optimizer.safetensors``  optimizer state arrays (moments, int8 momentum + scales, GaLore
                             projectors, step counters as 0-d arrays), keys ``GROUP/KEY``
- ``config.toml``            the resolved configuration
- ``state.json``             step, data cursor, RNG state, tokenizer file name, metrics summary
- ``tokenizer.json``         the tokenizer, so export and generation need nothing else

A checkpoint is written into ``.tmp-step-…`` and renamed into place, so a crash mid-write
leaves the previous checkpoint untouched and loadable.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

_STEP_DIR = re.compile(r"^step-(\d+)$")
FILES = ("model.safetensors", "optimizer.safetensors", "config.toml", "state.json")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read."""


def list_checkpoints(root):
    """Completed checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and all((p / f).exists() for f in FILES):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root):
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def save_checkpoint(root, step, params, optimizer_state, config_toml, state, tokenizer_path=None, keep_last=3):
    """Write ``root/step-NNNNNN`` atomically and prune to the newest ``keep_last``.

    ``params`` and ``optimizer_state`` map names to numpy arrays; ``state`` is JSON-able.
    Refuses non-finite parameters (a checkpoint is never written from non-finite state).
    """
    from safetensors.numpy import save_file

    for name, a in params.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"refusing to write a checkpoint: parameter {name} has non-finite values")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(tmp / "model.safetensors"))
        save_file({k: np.ascontiguousarray(v) for k, v in optimizer_state.items()}, str(tmp / "optimizer.safetensors"))
        (tmp / "config.toml").write_text(config_toml)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            state = dict(state, tokenizer="tokenizer.json")
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
            old = root / f".old-step-{step:06d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in root.glob(".tmp-step-*"):  # leftovers of a crashed earlier write
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path):
    for f in Path(path).iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def load_checkpoint(path):
    """Read a checkpoint directory (or the newest one under a run's ``checkpoints/``).

    Returns dict with ``params``, ``optimizer``, ``config_toml``, ``state``, ``path``.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not _STEP_DIR.match(path.name):
        for candidate in (path, path / "checkpoints"):
            newest = latest_checkpoint(candidate)
            if newest is not None:
                path = newest
                break
    missing = [f for f in FILES if not (path / f).exists()]
    if missing:
        raise CheckpointError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})")
    try:
        params = load_file(str(path / "model.safetensors"))
        optimizer = load_file(str(path / "optimizer.safetensors"))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read safetensors data ({exc})") from None
    try:
        state = json.loads((path / "state.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / 'state.json'}: invalid JSON ({exc})") from None
    for name, a in params.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CheckpointError(f"{path / 'model.safetensors'}: tensor {name} has non-finite values")
    return {
        "params": params,
        "optimizer": optimizer,
        "config_toml": (path / "config.toml").read_text(),
        "state": state,
        "path": path,
        "tokenizer_path": path / "tokenizer.json" if (path / "tokenizer.json").exists() else None,
    }


def rng_state_to_json(rng):
    """A numpy Generator's state as JSON-able data (PCG64 ints are Python ints)."""
    return rng.bit_generator.state


def rng_from_json(state):
    bg = getattr(np.random, state["bit_generator"])()
    bg.state = state
    return np.random.Generator(bg)
