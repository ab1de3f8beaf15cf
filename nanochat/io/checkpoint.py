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
# Bounds of a checkpoint's files (docs/limits.md). MAX_STEP is config.MAX_STEPS: a step past it
# could not have been trained, and would name a step-4611686018427387904 directory on save.
MAX_STEP = 10**9
MAX_COUNT = 2**62                      # tokens, data_step: int64-safe
MAX_STATE_BYTES = 64 << 20             # state.json: a million validation points fit in 40 MB
MAX_CONFIG_BYTES = 1 << 20             # config.toml (config.MAX_CONFIG_BYTES)
MAX_JSON_DEPTH = 32                    # state.json nests 4 levels deep
# safetensors dtypes each file may hold: weights are float; optimizer state adds int8 momentum,
# uint8 codes and int64 step counters.
_MODEL_DTYPES = ("F64", "F32", "F16")
_OPTIMIZER_DTYPES = ("F64", "F32", "F16", "I64", "I32", "I8", "U8")


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
    _remove_half_pruned(root, step)
    if keep_last > 0:
        others = [p for p in list_checkpoints(root) if p != final]
        for old in others[: max(0, len(others) - (keep_last - 1))]:
            _prune(root, old)
    return final


def _prune(root, path):
    """Delete a checkpoint directory: renamed aside first, so an interrupted delete never leaves a
    half-deleted ``step-N`` behind (the ``.del-`` leftover is removed by the next save)."""
    doomed = root / f".del-{path.name}-{os.getpid()}"
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_half_pruned(root, step):
    """Remove what interrupted prunes left: ``.del-step-*`` directories, and older ``step-N``
    directories missing some of their files (pruned before deletes were renamed aside; no
    complete write ever leaves one, so they can never be loaded)."""
    for p in root.iterdir():
        if p.name.startswith(".del-step-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            continue
        m = _STEP_DIR.match(p.name)
        if m and int(m.group(1)) < step and p.is_dir() and not all((p / f).is_file() for f in FILES):
            shutil.rmtree(p, ignore_errors=True)


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
    # The small files first: a bad state.json or config fails before any tensor is read.
    state = _read_state(path / "state.json")
    m = _STEP_DIR.match(path.name)
    if m and int(m.group(1)) != state["step"]:
        raise CheckpointError(f"{path / 'state.json'}: step: {state['step']} does not match the directory name "
                              f"{path.name}")
    config_toml = _read_small_text(path / "config.toml", MAX_CONFIG_BYTES)
    arrays = {}
    for name, dtypes in (("model.safetensors", _MODEL_DTYPES), ("optimizer.safetensors", _OPTIMIZER_DTYPES)):
        file = path / name
        _check_safetensors_header(file, dtypes)
        try:
            arrays[name] = load_file(str(file))
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{file}: cannot read safetensors data ({reason})") from None
        bad = find_nonfinite(arrays[name])
        if bad is not None:
            raise CheckpointError(f"{file}: {bad}: the tensor has NaN or Inf values")
    _check_optimizer_arrays(path / "optimizer.safetensors", arrays["optimizer.safetensors"], state["step"])
    return {
        "params": arrays["model.safetensors"],
        "optimizer": arrays["optimizer.safetensors"],
        "config_toml": config_toml,
        "state": state,
        "path": path,
        "tokenizer_path": path / "tokenizer.json" if (path / "tokenizer.json").is_file() else None,
    }


def _read_small_text(file, limit):
    from nanochat.io.atomic import read_regular

    data = read_regular(file, limit, what="file", error=CheckpointError)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{file}: the file is not UTF-8 text (bad byte at offset {exc.start})") from None


def _depth(value, limit, depth=0):
    """Nesting depth of parsed JSON, stopping once past ``limit``."""
    if depth > limit:
        return depth
    if isinstance(value, dict):
        return max((_depth(v, limit, depth + 1) for v in value.values()), default=depth + 1)
    if isinstance(value, list):
        return max((_depth(v, limit, depth + 1) for v in value), default=depth + 1)
    return depth


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_state(file):
    from nanochat.io.atomic import read_json_object

    state = read_json_object(file, MAX_STATE_BYTES, what="state file", error=CheckpointError)
    if _depth(state, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{file}: the JSON nests deeper than {MAX_JSON_DEPTH} levels")
    for key, kind in _STATE_FIELDS.items():
        value = state.get(key)
        if value is None:
            raise CheckpointError(f"{file}: {key}: the field is missing")
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise CheckpointError(f"{file}: {key}: must be a {'non-negative integer' if kind is int else 'JSON object'}, "
                                  f"got {_show(value)}")
    for key, top in (("step", MAX_STEP), ("tokens", MAX_COUNT), ("data_step", MAX_COUNT)):
        if state[key] > top:
            raise CheckpointError(f"{file}: {key}: {state[key]} is past the limit of {top} (docs/limits.md)")
    skipped = state.get("skipped_steps", 0)
    if isinstance(skipped, bool) or not isinstance(skipped, int) or not 0 <= skipped <= MAX_COUNT:
        raise CheckpointError(f"{file}: skipped_steps: must be an integer in [0, {MAX_COUNT}], got {_show(skipped)}")
    for key in ("backend", "tokenizer"):
        if key in state and not isinstance(state[key], str):
            raise CheckpointError(f"{file}: {key}: must be a string, got {_show(state[key])}")
    if state.get("tokenizer", "tokenizer.json") != "tokenizer.json":
        raise CheckpointError(f"{file}: tokenizer: must be 'tokenizer.json', got {_show(state['tokenizer'])}")
    _check_history(file, state.get("val_history", []), state["step"])
    rng_from_json(state["rng"], where=file)  # validates it
    return state


def _check_history(file, history, step):
    if not isinstance(history, list):
        raise CheckpointError(f"{file}: val_history: must be a list of [step, loss] pairs, got {_show(history)}")
    last = -1
    for i, entry in enumerate(history):
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) \
            and not isinstance(entry[0], bool) and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool)
        if not ok:
            raise CheckpointError(f"{file}: val_history[{i}]: must be a [step, loss] pair, got {_show(entry)}")
        if not last <= entry[0] <= step:
            raise CheckpointError(f"{file}: val_history[{i}]: step {entry[0]} is out of order or past the "
                                  f"checkpoint's step {step}")
        last = entry[0]


def _check_safetensors_header(file, dtypes):
    """Read the safetensors header alone (8-byte length + JSON) and refuse dtypes this file never holds."""
    from nanochat.io.atomic import open_regular

    with open_regular(file, what="file", error=CheckpointError) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: header: cannot read safetensors data (the file is {size} bytes, too short "
                                  "for a header)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{file}: header: cannot read safetensors data (it announces {n} bytes of JSON, "
                                  f"more than the file holds or than 100 MiB)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{file}: header: cannot read safetensors data (not UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: header: cannot read safetensors data (not a JSON object)")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in dtypes:
            raise CheckpointError(f"{file}: {name}: dtype {_show(dtype)} is not one this file holds "
                                  f"({', '.join(dtypes)})")


def _check_optimizer_arrays(file, arrays, step):
    """Key layout ``GROUP/INDEX.NAME``; step counters are int64 scalars in [0, step]."""
    for key, a in arrays.items():
        group, _, rest = key.partition("/")
        index, _, name = rest.partition(".")
        if not group or not index.isdigit() or not name:
            raise CheckpointError(f"{file}: {key}: not a GROUP/INDEX.NAME optimizer state key")
        if name == "step":
            if a.dtype != np.int64 or a.shape != ():
                raise CheckpointError(f"{file}: {key}: a step counter must be an int64 scalar, got {a.dtype} {a.shape}")
            if not 0 <= int(a) <= max(step, 0) + 1:
                raise CheckpointError(f"{file}: {key}: step counter {int(a)} is outside [0, {step}] "
                                      f"(the checkpoint's step)")


def check_optimizer_coverage(file, arrays, groups, step):
    """After step 0 every parameter of every optimizer group has state: CheckpointError naming the
    first that has none (a partial file would silently restart that parameter's momentum).

    ``groups`` maps a group label to its number of parameters."""
    if step == 0:
        return
    present = {}
    for key in arrays:
        group, _, rest = key.partition("/")
        present.setdefault(group, set()).add(int(rest.partition(".")[0]))
    for label, n in groups.items():
        have = present.get(label, set())
        missing = [i for i in range(n) if i not in have]
        if missing:
            raise CheckpointError(f"{file}: {label}/{missing[0]}: no optimizer state for this parameter "
                                  f"({len(missing)} of {n} in group {label!r} missing) at step {step}")


def rng_state_to_json(rng):
    """A numpy Generator's state as JSON-able data (PCG64 ints are Python ints)."""
    return rng.bit_generator.state


def rng_from_json(state, where="RNG state"):
    """A numpy Generator restored from ``rng_state_to_json`` output (CheckpointError if it is not one)."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in _BIT_GENERATORS:
        raise CheckpointError(f"{where}: rng: does not hold a numpy bit generator state "
                              f"(bit_generator {name!r}, expected one of {', '.join(_BIT_GENERATORS)})")
    bg = getattr(np.random, name)()
    try:
        bg.state = state
    except Exception as exc:  # numpy raises TypeError, ValueError, KeyError, OverflowError, ...
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{where}: rng: not a valid {name} state ({type(exc).__name__}: {reason})") from None
    return np.random.Generator(bg)
