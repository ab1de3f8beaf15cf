"""Checkpoints: a directory per step, written atomically, the last k kept.

Layout of ``OUT/checkpoints/step-000400/``:
- ``model.safetensors``      parameters by name (float32)
- ``optimizer.safetensors``  optimizer state arrays (moments, int8 momentum + scales, GaLore
                             projectors, step counters as 0-d arrays), keys ``GROUP/KEY``
- ``config.toml``            the resolved configuration
- ``state.json``             step, tokens, data cursor (micro-batches consumed), RNG state,
                             validation history, tokenizer file name
- ``tokenizer.json``         the tokenizer (when the data has one), so export and generation
                             need nothing else

A checkpoint is written into ``.tmp-step-…`` and renamed into place, so a crash mid-write
leaves the previous checkpoint untouched and loadable; only complete ``step-N`` directories
are ever listed. Re-saving an existing step swaps the old directory aside first (``.old-step-…``)
and a crash inside that swap is repaired by the next save. Pruning keeps the ``keep_last``
newest steps and never deletes the checkpoint just written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

_STEP_DIR = re.compile(r"^step-(\d+)$")
_OLD_DIR = re.compile(r"^\.old-step-(\d+)-\d+$")
FILES = ("model.safetensors", "optimizer.safetensors", "config.toml", "state.json")
# state.json fields a resume needs, with their JSON types.
_STATE_FIELDS = {"step": int, "tokens": int, "data_step": int, "rng": dict}
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read."""


def list_checkpoints(root):
    """Completed checkpoint directories under ``root``, oldest (lowest step) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in FILES):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root):
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def find_nonfinite(arrays):
    """Name of the first float array in ``arrays`` (name -> array) holding NaN or Inf, else None."""
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return name
    return None


def save_checkpoint(root, step, params, optimizer_state, config_toml, state, tokenizer_path=None, keep_last=3):
    """Write ``root/step-NNNNNN`` atomically and prune to the newest ``keep_last``; returns its path.

    ``params`` and ``optimizer_state`` map names to numpy arrays; ``state`` is JSON-able.
    Refuses (ValueError) non-finite parameters or optimizer state: a checkpoint is never
    written from non-finite state.
    """
    from safetensors.numpy import save_file

    for label, arrays in (("parameter", params), ("optimizer state", optimizer_state)):
        bad = find_nonfinite(arrays)
        if bad is not None:
            raise ValueError(f"refusing to write a checkpoint: {label} {bad} has non-finite values")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _repair_interrupted_swaps(root)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({k: _c_order(v) for k, v in params.items()}, str(tmp / "model.safetensors"))
        save_file({k: _c_order(v) for k, v in optimizer_state.items()}, str(tmp / "optimizer.safetensors"))
        (tmp / "config.toml").write_text(config_toml, encoding="utf-8")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            state = dict(state, tokenizer="tokenizer.json")
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
        _fsync_files(tmp)
        if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
            old = root / f".old-step-{step:06d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in root.glob(".tmp-step-*"):  # leftovers of a crashed earlier write
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last > 0:
        others = [p for p in list_checkpoints(root) if p != final]
        for old in others[: max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _c_order(a):
    """C-contiguous without changing the shape (``np.ascontiguousarray`` turns 0-d step counters into 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


def _repair_interrupted_swaps(root):
    """Put back ``.old-step-N`` directories whose replacement never arrived (a crash mid-swap)."""
    for p in root.iterdir():
        m = _OLD_DIR.match(p.name)
        if not m:
            continue
        target = root / f"step-{int(m.group(1)):06d}"
        if target.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.replace(p, target)


def _fsync_files(path):
    for f in Path(path).iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _fsync_dir(path):
    """Make the rename itself durable (directories can be fsynced on POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path):
    """Read a checkpoint directory (or the newest one under a run directory or its ``checkpoints/``).

    Returns dict with ``params``, ``optimizer``, ``config_toml``, ``state``, ``path``,
    ``tokenizer_path``. Every problem is a ``CheckpointError`` naming the file and what is wrong.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (give a checkpoint directory or a run directory)")
    if not _STEP_DIR.match(path.name) and not (path / "state.json").exists():
        # a run directory (or its checkpoints/ folder): take the newest complete checkpoint
        for candidate in (path, path / "checkpoints"):
            newest = latest_checkpoint(candidate)
            if newest is not None:
                path = newest
                break
        else:
            raise CheckpointError(f"{path}: no complete checkpoint here or under {path / 'checkpoints'}")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})")
    arrays = {}
    for name in ("model.safetensors", "optimizer.safetensors"):
        file = path / name
        try:
            arrays[name] = load_file(str(file))
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{file}: cannot read safetensors data ({reason})") from None
        bad = find_nonfinite(arrays[name])
        if bad is not None:
            raise CheckpointError(f"{file}: tensor {bad} has NaN or Inf values")
    state = _read_state(path / "state.json")
    try:
        config_toml = (path / "config.toml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / 'config.toml'}: cannot read the file ({exc})") from None
    return {
        "params": arrays["model.safetensors"],
        "optimizer": arrays["optimizer.safetensors"],
        "config_toml": config_toml,
        "state": state,
        "path": path,
        "tokenizer_path": path / "tokenizer.json" if (path / "tokenizer.json").is_file() else None,
    }


def _read_state(file):
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read the file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(state).__name__}")
    for key, kind in _STATE_FIELDS.items():
        value = state.get(key)
        if value is None:
            raise CheckpointError(f"{file}: missing field {key!r}")
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise CheckpointError(f"{file}: field {key!r} must be a {'non-negative integer' if kind is int else 'JSON object'}, "
                                  f"got {value!r}")
    rng_from_json(state["rng"], where=file)  # validates it
    return state


def rng_state_to_json(rng):
    """A numpy Generator's state as JSON-able data (PCG64 ints are Python ints)."""
    return rng.bit_generator.state


def rng_from_json(state, where="RNG state"):
    """A numpy Generator restored from ``rng_state_to_json`` output (CheckpointError if it is not one)."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in _BIT_GENERATORS:
        raise CheckpointError(f"{where}: field 'rng' does not hold a numpy bit generator state "
                              f"(bit_generator {name!r}, expected one of {', '.join(_BIT_GENERATORS)})")
    bg = getattr(np.random, name)()
    try:
        bg.state = state
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{where}: field 'rng' is not a valid {name} state ({exc})") from None
    return np.random.Generator(bg)
