"""The ``.mhc`` sidecar file: static mHC parameters (SPEC section 3, nanochat-rs-ternary compatible).

Layout, little-endian, no padding::

    u32 magic        0x6D484321 (bytes 21 43 48 6D, "!CHm")
    u32 version      1 or 2 read, 2 written
    u32 n_sublayers  <= 10000, records in order blk0.attn, blk0.ffn, blk1.attn, ...
    u32 n_streams    2 or 4
    n_sublayers records of f32:
        n = 2:  9 values  alpha_logit, pre_logits[2], pre_bias[2], post_logits[2], post_bias[2]
        n = 4: 40 values  res_logits[24], pre_logits[4], pre_bias[4], post_logits[4], post_bias[4]

Version 1 is what nanochat-rs-ternary writes; its records have exactly this layout (36 and 160
bytes), so both versions are read the same way. Version 2 marks files written here (same bytes
otherwise) and leaves room for a later layout change to be told apart.

A record is a dict named as in ``reference.mhc`` (``alpha_logit`` ``[1]`` or ``res_logits``
``[24]``, then ``pre_logits``, ``pre_bias``, ``post_logits``, ``post_bias`` ``[n]``). Only static
parameters are stored; a dynamic-mode exporter passes the static part of each sub-layer.

The reader checks the header and the file length against it before reading any record, so a
hostile header cannot make it allocate; every problem is one ``ValueError`` sentence naming the
file, the field and what is wrong. The writer replaces the file atomically.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from nanochat.io.atomic import atomic_write_bytes, open_regular

MAGIC = 0x6D484321
WRITE_VERSION = 2
READ_VERSIONS = (1, 2)
MAX_SUBLAYERS = 10000
HEADER = struct.Struct("<4I")
FIELDS = {
    2: (("alpha_logit", 1), ("pre_logits", 2), ("pre_bias", 2), ("post_logits", 2), ("post_bias", 2)),
    4: (("res_logits", 24), ("pre_logits", 4), ("pre_bias", 4), ("post_logits", 4), ("post_bias", 4)),
}
RECORD_FLOATS = {n: sum(size for _, size in fields) for n, fields in FIELDS.items()}  # 9 and 40


def record_bytes(n_streams):
    return 4 * RECORD_FLOATS[n_streams]


def write_mhc(path, records, n_streams):
    """Write ``records`` (one dict per sub-layer) for ``n_streams`` (2 or 4) to ``path``, atomically."""
    if n_streams not in FIELDS:
        raise ValueError(f"{path}: n_streams must be 2 or 4 for an .mhc file, got {n_streams}")
    records = list(records)
    if len(records) > MAX_SUBLAYERS:
        raise ValueError(f"{path}: {len(records)} sub-layers exceed the .mhc limit of {MAX_SUBLAYERS}")
    table = np.empty((len(records), RECORD_FLOATS[n_streams]), dtype="<f4")
    for i, record in enumerate(records):
        table[i] = _flatten_record(path, i, record, n_streams)
    payload = HEADER.pack(MAGIC, WRITE_VERSION, len(records), n_streams) + table.tobytes()
    atomic_write_bytes(path, payload)


def _flatten_record(path, index, record, n_streams):
    names = [name for name, _ in FIELDS[n_streams]]
    if set(record) != set(names):
        raise ValueError(
            f"{path}: record {index} has fields {sorted(record)}, an N={n_streams} .mhc record needs exactly {names}"
        )
    parts = []
    for name, size in FIELDS[n_streams]:
        value = _to_host(record[name])
        if value.size != size:
            raise ValueError(f"{path}: record {index} field {name} has {value.size} values, expected {size}")
        with np.errstate(over="ignore"):
            as_f32 = value.astype(np.float32).reshape(-1)
        if not np.all(np.isfinite(as_f32)):
            raise ValueError(
                f"{path}: record {index} field {name} is not finite in float32: {value.reshape(-1).tolist()}"
            )
        parts.append(as_f32)
    return np.concatenate(parts)


def _to_host(value):
    """A numpy array from a numpy/cupy array, a Tensor or a list."""
    value = getattr(value, "data", value) if type(value).__name__ == "Tensor" else value
    return np.asarray(value.get() if hasattr(value, "get") and not isinstance(value, np.ndarray) else value)


def read_mhc(path):
    """Read an ``.mhc`` file -> ``(n_streams, [record dict per sub-layer])`` with float32 arrays.

    Every problem is one ``ValueError``: a missing path, a directory, a FIFO or device (checked
    without blocking), a damaged header or body."""
    with open_regular(path, ".mhc file") as f:
        file_size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            raise ValueError(f"{path}: header is truncated ({len(head)} of {HEADER.size} bytes)")
        magic, version, n_sublayers, n_streams = HEADER.unpack(head)
        if magic != MAGIC:
            raise ValueError(f"{path}: magic is {magic:#010x}, expected {MAGIC:#010x} (not an .mhc file)")
        if version not in READ_VERSIONS:
            raise ValueError(f"{path}: version {version} is not supported (readable versions: 1, 2)")
        if n_streams not in FIELDS:
            raise ValueError(f"{path}: n_streams is {n_streams}, must be 2 or 4")
        if n_sublayers > MAX_SUBLAYERS:
            raise ValueError(f"{path}: n_sublayers is {n_sublayers}, more than the limit of {MAX_SUBLAYERS}")
        body_size = n_sublayers * record_bytes(n_streams)
        expected = HEADER.size + body_size
        if file_size < expected:
            raise ValueError(
                f"{path}: records are truncated (file has {file_size} bytes, the header announces "
                f"{n_sublayers} N={n_streams} records needing {expected})"
            )
        if file_size > expected:
            raise ValueError(
                f"{path}: {file_size - expected} trailing bytes after the {n_sublayers} records the header announces"
            )
        body = f.read(body_size + 1)  # one extra byte detects a file that grew while reading
    if len(body) != body_size:
        raise ValueError(f"{path}: records changed size while reading ({len(body)} bytes instead of {body_size})")
    table = np.frombuffer(body, dtype="<f4").reshape(n_sublayers, RECORD_FLOATS[n_streams]).astype(np.float32)
    bad = np.argwhere(~np.isfinite(table))
    if bad.size:
        index, column = (int(v) for v in bad[0])
        name = _field_at(n_streams, column)
        raise ValueError(f"{path}: record {index} field {name} holds a non-finite value ({table[index, column]})")
    return n_streams, [_split_record(row, n_streams) for row in table]


def _field_at(n_streams, column):
    start = 0
    for name, size in FIELDS[n_streams]:
        if column < start + size:
            return name if size == 1 else f"{name}[{column - start}]"
        start += size
    raise AssertionError(column)  # pragma: no cover - column < RECORD_FLOATS


def _split_record(row, n_streams):
    record, start = {}, 0
    for name, size in FIELDS[n_streams]:
        record[name] = row[start:start + size].copy()
        start += size
    return record
