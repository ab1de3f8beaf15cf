"""Pre-tokenized ``.bin`` token files (``--data corpus.bin``) and their JSON sidecars.

    ds = load_token_file("corpus.bin", vocab_size=4096)     # a Dataset (val = last 1% of tokens)
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from nanochat.data.corpus import FORMAT_VERSION, VAL_FRACTION, Dataset, _check_val_fraction
from nanochat.data.tokenizer import DEFAULT_VOCAB_SIZE, MAX_VOCAB_SIZE, Tokenizer

SIDECAR_KEYS = ("vocab_size", "tokenizer", "dtype", "eot_id")
MAX_SIDECAR_BYTES = 1 << 16  # a sidecar holds four short fields
BIN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def _read_sidecar(path: Path) -> dict:
    from nanochat.io.atomic import read_json_object

    value = read_json_object(path, MAX_SIDECAR_BYTES, what="sidecar")
    for key in value:
        if key not in SIDECAR_KEYS:
            raise ValueError(f"sidecar {path} has unknown field {key!r} (known: {', '.join(SIDECAR_KEYS)}).")
    for key in ("vocab_size", "eot_id"):
        v = value.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"sidecar {path} field {key!r} must be a non-negative integer, got {v!r}.")
    if "dtype" in value and value["dtype"] not in BIN_DTYPES:
        raise ValueError(
            f"sidecar {path} field 'dtype' must be one of {', '.join(BIN_DTYPES)}, got {value['dtype']!r}."
        )
    if "tokenizer" in value and not isinstance(value["tokenizer"], str):
        raise ValueError(
            f"sidecar {path} field 'tokenizer' must be a path string, got {value['tokenizer']!r}."
        )
    return value


def _first_index_at_least(tokens: np.ndarray, limit: int, chunk: int = 1 << 24) -> int:
    for start in range(0, tokens.size, chunk):
        hits = np.flatnonzero(tokens[start : start + chunk] >= limit)
        if hits.size:
            return start + int(hits[0])
    return -1


def _byte_count(tokens: np.ndarray, lengths: np.ndarray, chunk: int = 1 << 24) -> int:
    return int(sum(lengths[tokens[s : s + chunk]].sum() for s in range(0, tokens.size, chunk)))


def load_token_file(
    path: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB_SIZE, val_fraction: float = VAL_FRACTION
) -> Dataset:
    """A ``.bin`` of raw little-endian token ids as a Dataset (val = last 1% of tokens).

    An optional sidecar ``<name>.json`` may give ``vocab_size``, ``tokenizer`` (path to a
    tokenizer JSON, relative to the sidecar), ``dtype`` ("uint16" default, or "uint32")
    and ``eot_id``. Without a sidecar vocab size, ``vocab_size`` (or the tokenizer's size)
    is the declared vocab size and every token must be below it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"token file {path} " + ("is not a regular file." if path.exists() else "does not exist."))
    sidecar_path = path.with_suffix(".json")
    sidecar = _read_sidecar(sidecar_path) if os.path.lexists(sidecar_path) else {}
    dtype = BIN_DTYPES[sidecar.get("dtype", "uint16")]

    tokenizer, tok_path = None, None
    if "tokenizer" in sidecar:
        tok_path = (sidecar_path.parent / sidecar["tokenizer"]).expanduser()
        if not tok_path.is_file():
            raise ValueError(
                f"sidecar {sidecar_path} field 'tokenizer' names {tok_path}, which does not exist."
            )
        tokenizer = Tokenizer.load(tok_path)
    if "vocab_size" in sidecar:
        declared = sidecar["vocab_size"]
        if tokenizer is not None and declared < tokenizer.vocab_size:
            raise ValueError(
                f"sidecar {sidecar_path} field 'vocab_size' is {declared}, smaller than its tokenizer's "
                f"{tokenizer.vocab_size} tokens."
            )
    else:
        declared = tokenizer.vocab_size if tokenizer is not None else vocab_size
    # Any size works for ids already made (a character-level vocab of 65, say); the
    # BPE lower bound applies only to training a tokenizer.
    if isinstance(declared, bool) or not isinstance(declared, (int, np.integer)) or not 1 <= declared <= MAX_VOCAB_SIZE:
        where = f"sidecar {sidecar_path} field 'vocab_size'" if "vocab_size" in sidecar else f"{path}: vocab size"
        raise ValueError(f"{where} must be an integer in [1, {MAX_VOCAB_SIZE}] (docs/limits.md), got {declared!r}.")
    declared = int(declared)
    if declared > np.iinfo(dtype).max + 1:
        raise ValueError(
            f"{path}: vocab size {declared} does not fit {dtype.name} tokens; set \"dtype\": \"uint32\"."
        )
    eot_id = tokenizer.eot_id if tokenizer is not None else sidecar.get("eot_id")
    if eot_id is not None and eot_id >= declared:
        raise ValueError(
            f"sidecar {sidecar_path} field 'eot_id' is {eot_id}, not below the vocab size {declared}."
        )

    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(
            f"{path} has {size} bytes, not a whole number of {dtype.name} tokens ({dtype.itemsize} bytes each)."
        )
    n = size // dtype.itemsize
    if n < 2:
        raise ValueError(f"{path} holds {n} token(s); at least 2 are needed for a train/val split.")
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    top = int(tokens.max())
    if top >= declared:
        at = _first_index_at_least(tokens, declared)
        raise ValueError(
            f"{path} holds token id {top} (first bad id at index {at}), not below the vocab size {declared}."
        )

    n_val = max(1, math.ceil(n * _check_val_fraction(val_fraction)))
    train_tokens, val_tokens = tokens[: n - n_val], tokens[n - n_val :]
    lengths = None
    if tokenizer is not None:  # ids past the tokenizer (a padded vocab) count as 0 bytes
        lengths = np.zeros(declared, dtype=np.int64)  # declared <= MAX_VOCAB_SIZE: at most 8 MiB
        lengths[: tokenizer.vocab_size] = tokenizer.token_byte_lengths()
    meta = {
        "format_version": FORMAT_VERSION,
        "source": {"kind": "bin", "path": str(path)},
        "vocab_size": declared,
        "eot_id": eot_id,
        "dtype": dtype.str,
        "train_tokens": int(train_tokens.size),
        "val_tokens": int(val_tokens.size),
        "train_bytes": _byte_count(train_tokens, lengths) if lengths is not None else None,
        "val_bytes": _byte_count(val_tokens, lengths) if lengths is not None else None,
    }
    return Dataset(
        tokenizer=tokenizer, train_tokens=train_tokens, val_tokens=val_tokens, meta=meta, tokenizer_path=tok_path
    )
