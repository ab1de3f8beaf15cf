"""The hardened GGUF reader (SPEC sections 2, 8, 9; layout in ``docs/gguf.md``).

    loaded = read_gguf("model.gguf")                         # LoadedModel, or GGUFError

The reader trusts nothing in the file. A bounded scan walks the header, the metadata and the
tensor table and checks every count and length against the bytes actually there before reading
it (so no allocation is sized by an unchecked length), every value type, and every tensor's
type, shape and byte range against the file size. The metadata is then rebuilt into a validated
``Config``, every expected tensor is checked for presence, type and shape, and the data is read
from the same mapping and checked for NaN/Inf. ``read_gguf(path, cross_check=True)`` also parses
the file with ``gguf.GGUFReader`` and requires it to agree (the tests do). Any problem is a
``GGUFError`` (a ``ValueError``) with one sentence naming the file, the field and the problem.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from nanochat.config import Config, ConfigError, ModelConfig
from nanochat.io.atomic import open_regular
from nanochat.io.gguf import (
    ARCH, ARCHITECTURES, BITNET_ARCH, FORMAT_VERSION, GGUFError, LoadedModel, _bitnet_hparams, _gguf, _is_mhc,
    _tokenizer_metadata, _tq2_0_to_packed, bitnet_problems, gguf_tensor_names, ternary_encoding,
)
from nanochat.model.params import parameter_specs

__all__ = ["read_gguf"]


# --- reading: the bounded structural scan -----------------------------------------------------

_GGUF_MAGIC = b"GGUF"
_READ_VERSIONS = (2, 3)
_MAX_KEY_BYTES = 1 << 16
_MAX_NAME_BYTES = 1 << 12
_MAX_DIMS = 4
_MAX_ALIGNMENT = 1 << 16
_MAX_STRING_ITEMS = 4 << 20          # tokens and merges of the largest vocabulary (2^20) with room to spare
_MIN_KV_BYTES = 8 + 4 + 1            # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8


@dataclass
class _KV:
    vtype: int                 # GGUFValueType
    subtype: int | None        # item type of an array
    value: Any                 # python scalar, str, np.ndarray (scalar array) or list[str]


@dataclass
class _TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]     # numpy order (GGUF ne reversed)
    offset: int                # absolute file offset of the data
    n_bytes: int


@dataclass
class _Header:
    version: int
    kv: dict[str, _KV]
    tensors: dict[str, _TensorInfo]
    data_offset: int
    file_size: int


class _Scanner:
    """Reads little-endian GGUF fields with a bounds check before every read."""

    def __init__(self, buf, size, path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, problem):
        raise GGUFError(f"{self.path}: {problem}.")

    def need(self, n, what):
        if n > self.size - self.pos:
            self.fail(f"the file is truncated inside {what} (needs {n} bytes at offset {self.pos}, "
                      f"the file has {self.size})")

    def unpack(self, fmt, what):
        s = struct.calcsize(fmt)
        self.need(s, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += s
        return value

    def string(self, what, limit=None):
        n = self.unpack("<Q", f"the length of {what}")
        if limit is not None and n > limit:
            self.fail(f"{what} is {n} bytes long, more than the {limit} allowed")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            self.fail(f"{what} is not valid UTF-8 (bad byte at position {exc.start})")


def _value_formats():
    V = _gguf().GGUFValueType
    return {
        V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
        V.FLOAT32: "<f", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d", V.BOOL: "<B",
    }


def _scan_value(sc: _Scanner, vtype: int, key: str) -> _KV:
    gguf = _gguf()
    V = gguf.GGUFValueType
    formats = _value_formats()
    what = f"metadata key {key!r}"
    if vtype in formats:
        value = sc.unpack(formats[vtype], what)
        if vtype == V.BOOL:
            if value > 1:
                sc.fail(f"{what} is a bool holding byte {value}, not 0 or 1")
            value = bool(value)
        return _KV(vtype, None, value)
    if vtype == V.STRING:
        return _KV(vtype, None, sc.string(what))
    if vtype != V.ARRAY:
        sc.fail(f"{what} has unknown value type {vtype}")
    subtype = sc.unpack("<I", f"the item type of {what}")
    count = sc.unpack("<Q", f"the length of {what}")
    if subtype == V.STRING:
        if count > (sc.size - sc.pos) // 8:
            sc.fail(f"{what} announces {count} strings, more than the rest of the file can hold")
        if count > _MAX_STRING_ITEMS:  # each becomes a Python str: bound the object count, not only the bytes
            sc.fail(f"{what} announces {count} strings, more than the limit of {_MAX_STRING_ITEMS}")
        items = [sc.string(f"item {i} of {what}") for i in range(count)]
        return _KV(vtype, subtype, items)
    if subtype not in formats:
        kind = "nested arrays are not supported" if subtype == V.ARRAY else f"unknown item type {subtype}"
        sc.fail(f"{what} is an array with {kind}")
    itemsize = struct.calcsize(formats[subtype])
    if count > (sc.size - sc.pos) // itemsize:
        sc.fail(f"{what} announces {count} items, more than the rest of the file can hold")
    raw = bytes(sc.buf[sc.pos:sc.pos + count * itemsize])
    sc.pos += count * itemsize
    arr = np.frombuffer(raw, dtype=np.dtype(formats[subtype]))
    if subtype == V.BOOL:
        if (arr > 1).any():
            sc.fail(f"{what} is a bool array holding a byte that is not 0 or 1")
        arr = arr.astype(bool)
    return _KV(vtype, subtype, arr)


@contextmanager
def _mapped(path: str):
    """``(buffer, size)`` of a read-only mapping of ``path``; GGUFError if it is not a readable GGUF-sized file."""
    f = open_regular(path, "GGUF file", GGUFError)  # never blocks on a FIFO or device
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFError(f"{path}: the file is {size} bytes, too short for a GGUF header (24 bytes); "
                            "it is truncated or not a GGUF file.")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            # Slices of an mmap are bytes copies, so no view outlives the mapping.
            yield buf, size


def _scan(path: str) -> _Header:
    """The bounded structural scan of ``path`` alone (header, metadata, tensor table)."""
    with _mapped(path) as (buf, size):
        return _scan_buffer(buf, size, path)


def _scan_buffer(buf, size, path) -> _Header:
    gguf = _gguf()
    sc = _Scanner(buf, size, path)
    magic = bytes(buf[:4])
    if magic != _GGUF_MAGIC:
        sc.fail(f"the magic is {magic!r}, expected {_GGUF_MAGIC!r} (not a GGUF file)")
    sc.pos = 4
    version = sc.unpack("<I", "the version")
    if version not in _READ_VERSIONS:
        if version and version & 0xFFFF == 0:
            sc.fail(f"the version field reads {version:#x}, a big-endian GGUF file, which is not supported")
        sc.fail(f"version {version} is not supported (readable versions: 2, 3)")
    n_tensors = sc.unpack("<Q", "the tensor count")
    n_kv = sc.unpack("<Q", "the metadata count")
    if n_kv > (size - sc.pos) // _MIN_KV_BYTES:
        sc.fail(f"the header announces {n_kv} metadata entries, more than the file can hold")
    if n_tensors > (size - sc.pos) // _MIN_TENSOR_INFO_BYTES:
        sc.fail(f"the header announces {n_tensors} tensors, more than the file can hold")
    kv: dict[str, _KV] = {}
    for i in range(n_kv):
        key = sc.string(f"the key of metadata entry {i}", limit=_MAX_KEY_BYTES)
        if not key:
            sc.fail(f"metadata entry {i} has an empty key")
        if key in kv:
            sc.fail(f"metadata key {key!r} appears twice")
        vtype = sc.unpack("<I", f"the value type of metadata key {key!r}")
        kv[key] = _scan_value(sc, vtype, key)
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        a = kv["general.alignment"]
        if a.vtype != gguf.GGUFValueType.UINT32 or not (0 < a.value <= _MAX_ALIGNMENT) or a.value & (a.value - 1):
            sc.fail(f"metadata key 'general.alignment' must be a uint32 power of two up to {_MAX_ALIGNMENT}")
        alignment = a.value
    infos = []
    for i in range(n_tensors):
        infos.append(_scan_tensor_info(sc, i, gguf))
    data_offset = -(-sc.pos // alignment) * alignment
    tensors: dict[str, _TensorInfo] = {}
    end = data_offset
    for name, ggml_type, shape, rel, n_bytes in infos:
        if name in tensors:
            sc.fail(f"tensor {name!r} appears twice")
        if rel % alignment:
            sc.fail(f"tensor {name!r} starts at data offset {rel}, not a multiple of the alignment {alignment}")
        start = data_offset + rel
        if start + n_bytes > size:
            sc.fail(f"tensor {name!r} needs bytes {start}..{start + n_bytes} but the file ends at {size}; "
                    "the file is truncated")
        tensors[name] = _TensorInfo(name, ggml_type, shape, start, n_bytes)
    spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in tensors.values())
    for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            sc.fail(f"the data of tensors {n0!r} and {n1!r} overlap")
    if spans:
        end = spans[-1][1]
    padded_end = -(-end // alignment) * alignment
    if size > max(padded_end, data_offset):
        sc.fail(f"{size - max(padded_end, data_offset)} bytes of trailing data follow the last tensor")
    return _Header(version, kv, tensors, data_offset, size)


def _scan_tensor_info(sc: _Scanner, index: int, gguf):
    name = sc.string(f"the name of tensor {index}", limit=_MAX_NAME_BYTES)
    what = f"tensor {name!r}"
    n_dims = sc.unpack("<I", f"the dimension count of {what}")
    if not 1 <= n_dims <= _MAX_DIMS:
        sc.fail(f"{what} has {n_dims} dimensions, expected 1 to {_MAX_DIMS}")
    ne = [sc.unpack("<Q", f"the dimensions of {what}") for _ in range(n_dims)]
    raw_type = sc.unpack("<I", f"the type of {what}")
    try:
        ggml_type = gguf.GGMLQuantizationType(raw_type)
        block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        sc.fail(f"{what} has unknown GGML type {raw_type}")
    rel = sc.unpack("<Q", f"the data offset of {what}")
    if any(n == 0 for n in ne):
        sc.fail(f"{what} has an empty dimension (ne = {ne})")
    if ne[0] % block:
        sc.fail(f"{what} has a first dimension of {ne[0]}, not a multiple of the {ggml_type.name} block size {block}")
    n_elements = math.prod(ne)  # python ints: no overflow
    n_bytes = n_elements // block * type_size
    if n_bytes > sc.size:
        sc.fail(f"{what} with ne = {ne} needs {n_bytes} bytes, more than the whole file ({sc.size})")
    return name, int(ggml_type), tuple(reversed(ne)), rel, n_bytes


# --- reading: metadata -> Config ----------------------------------------------------------------


def _fail(path, problem) -> None:
    problem = " ".join(str(problem).split())  # one line, whatever a library message held
    end = "" if problem.endswith(".") else "."
    raise GGUFError(f"{path}: {problem}{end}")


def _type_name(kv: _KV) -> str:
    V = _gguf().GGUFValueType
    if kv.vtype == V.ARRAY:
        return f"array of {V(kv.subtype).name}" if kv.subtype in set(V) else "array"
    return V(kv.vtype).name


def _require(header: _Header, key: str, kinds: tuple[str, ...], path):
    """The value of ``key`` if its GGUF type is one of ``kinds`` (int, float, bool, str, int_array, str_array)."""
    if key not in header.kv:
        _fail(path, f"required metadata key {key!r} is missing")
    kv = header.kv[key]
    value = _typed_value(kv, kinds)
    if value is _WRONG:
        _fail(path, f"metadata key {key!r} has type {_type_name(kv)}, expected {' or '.join(kinds)}")
    return value


_WRONG = object()


def _typed_value(kv: _KV, kinds):
    V = _gguf().GGUFValueType
    ints = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}
    floats = {V.FLOAT32, V.FLOAT64}
    for kind in kinds:
        if kind == "int" and kv.vtype in ints:
            return int(kv.value)
        if kind == "float" and kv.vtype in floats:
            return float(kv.value)
        if kind == "bool" and kv.vtype == V.BOOL:
            return bool(kv.value)
        if kind == "str" and kv.vtype == V.STRING:
            return kv.value
        if kind == "int_array" and kv.vtype == V.ARRAY and kv.subtype in ints:
            return [int(v) for v in kv.value]
        if kind == "str_array" and kv.vtype == V.ARRAY and kv.subtype == V.STRING:
            return kv.value
    return _WRONG


_KIND_TO_GGUF = {
    "bool": ("bool",),
    "int": ("int",),
    "float": ("float", "int"),
    "str": ("str",),
    "int_list": ("int_array",),
    "layers": ("str", "int_array"),
}


def _config_from_metadata(header: _Header, path) -> Config:
    p = ARCH + "."
    version = _require(header, p + "format_version", ("int",), path)
    if version != FORMAT_VERSION:
        _fail(path, f"metadata key '{p}format_version' is {version}; this reader understands version {FORMAT_VERSION}")
    values = {}
    for f in fields(ModelConfig):
        kind = f.metadata["spec"].kind
        values[f.name] = _require(header, p + f.name, _KIND_TO_GGUF[kind], path)
    try:
        return Config.from_dict({"model": values}, source=f"{path}: metadata '{ARCH}.*'")
    except ConfigError as exc:
        raise GGUFError(" ".join(str(exc).split())) from None


def _check_tensor_budget(model: ModelConfig, n_tensors: int, path) -> None:
    """Refuse configs that need more tensors than the file has, before sizing anything by them."""
    if 2 * model.n_layers + 2 > n_tensors:
        _fail(path, f"metadata says n_layers = {model.n_layers}, which needs at least {2 * model.n_layers + 2} "
                    f"tensors, but the file has {n_tensors}")
    if 3 * model.n_experts > n_tensors:
        _fail(path, f"metadata says n_experts = {model.n_experts}, which needs at least {3 * model.n_experts} "
                    f"tensors, but the file has {n_tensors}")
    if model.mtp_n_tokens > n_tensors:
        _fail(path, f"metadata says mtp_n_tokens = {model.mtp_n_tokens}, more than the {n_tensors} tensors in the file")


def _check_bitnet_metadata(header: _Header, model: ModelConfig, path) -> None:
    problems = bitnet_problems(model)
    if problems:
        _fail(path, f"the file says architecture 'bitnet' but its config has {'; '.join(problems)}")
    for key, expected in _bitnet_hparams(model).items():
        full = f"{BITNET_ARCH}.{key}"
        kinds = ("float",) if isinstance(expected, float) else ("int",)
        value = _require(header, full, kinds, path)
        if isinstance(expected, float):
            same = np.float32(value) == np.float32(expected)
        else:
            same = value == expected
        if not same:
            _fail(path, f"metadata key {full!r} is {value}, but the nanochat-ternary config gives {expected}")


def _tokenizer_from_metadata(header: _Header, model: ModelConfig, path) -> str | None:
    key = ARCH + ".tokenizer_json"
    if key not in header.kv:
        _check_ggml_tokenizer(header, model, path, None)
        return None
    text = _require(header, key, ("str",), path)
    from nanochat.data.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_json_str(text, source=f"metadata key {key!r}")
    except ValueError as exc:
        _fail(path, str(exc).rstrip("."))
    except BaseException as exc:  # the Rust library can panic on hostile JSON (PanicException is a BaseException)
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        _fail(path, f"metadata key {key!r} is not a valid tokenizer ({type(exc).__name__})")
    if tok.vocab_size > model.vocab_size:
        _fail(path, f"metadata key {key!r} holds a tokenizer of {tok.vocab_size} tokens, more than "
                    f"model.vocab_size = {model.vocab_size}")
    if "tokenizer.ggml.tokens" in header.kv:
        tokens = _require(header, "tokenizer.ggml.tokens", ("str_array",), path)
        if len(tokens) != model.vocab_size:
            _fail(path, f"metadata key 'tokenizer.ggml.tokens' lists {len(tokens)} tokens, expected "
                        f"model.vocab_size = {model.vocab_size}")
    _check_ggml_tokenizer(header, model, path, _tokenizer_metadata(text, model.vocab_size, path))
    return text


def _check_ggml_tokenizer(header: _Header, model: ModelConfig, path, expected) -> None:
    """The ``tokenizer.ggml.*`` keys (what llama.cpp reads) must be types and sizes that make sense,
    and, when the file embeds its tokenizer JSON (``expected``: what the writer derives from it),
    say exactly what that tokenizer says: tokens, token types, merges, BOS/EOS ids."""
    kv = header.kv
    V = model.vocab_size
    if "tokenizer.ggml.model" in kv:
        name = _require(header, "tokenizer.ggml.model", ("str",), path)
        if name != "gpt2":
            _fail(path, f"metadata key 'tokenizer.ggml.model' is {name[:40]!r}, expected 'gpt2' (byte-level BPE)")
    if "tokenizer.ggml.token_type" in kv:
        types = _require(header, "tokenizer.ggml.token_type", ("int_array",), path)
        if len(types) != V:
            _fail(path, f"metadata key 'tokenizer.ggml.token_type' lists {len(types)} types, expected "
                        f"model.vocab_size = {V}")
        bad = next((t for t in types if not 1 <= t <= 6), None)
        if bad is not None:
            _fail(path, f"metadata key 'tokenizer.ggml.token_type' holds {bad}, not a llama.cpp token type (1 to 6)")
        if expected is not None and types != expected["types"]:
            _fail(path, "metadata key 'tokenizer.ggml.token_type' differs from the embedded tokenizer's token types")
    if "tokenizer.ggml.merges" in kv:
        merges = _require(header, "tokenizer.ggml.merges", ("str_array",), path)
        if len(merges) > V:
            _fail(path, f"metadata key 'tokenizer.ggml.merges' lists {len(merges)} merges, more than "
                        f"model.vocab_size = {V}")
        bad = next((i for i, m in enumerate(merges) if len(m.split(" ")) != 2 or "" in m.split(" ")), None)
        if bad is not None:
            _fail(path, f"metadata key 'tokenizer.ggml.merges' item {bad} is not two tokens separated by one space")
        if expected is not None and merges != expected["merges"]:
            _fail(path, "metadata key 'tokenizer.ggml.merges' differs from the embedded tokenizer's merges")
    if expected is not None and "tokenizer.ggml.tokens" in kv and kv["tokenizer.ggml.tokens"].value != expected["tokens"]:
        _fail(path, "metadata key 'tokenizer.ggml.tokens' differs from the embedded tokenizer's vocabulary")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        if key in kv:
            value = _require(header, key, ("int",), path)
            if not 0 <= value < V:
                _fail(path, f"metadata key {key!r} is {value}, outside the vocabulary [0, {V})")
            if expected is not None and value != expected["eot"]:
                _fail(path, f"metadata key {key!r} is {value}, but the embedded tokenizer's end-of-text id is "
                            f"{expected['eot']}")


# --- reading: tensors ---------------------------------------------------------------------------


def _ggml_name(ggml_type: int) -> str:
    try:
        return _gguf().GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def _expected_tensors(model: ModelConfig, arch: str):
    """gguf name -> (parameter name, role, numpy shape, allowed GGML types)."""
    T = _gguf().GGMLQuantizationType
    specs = parameter_specs(model)
    G = model.group_size
    out = {}
    for pname, entries in gguf_tensor_names(model, arch).items():
        m_k = specs[pname].shape
        for tname, role in entries:
            if role == "float":
                out[tname] = (pname, role, m_k, (T.F32,) if _is_mhc(pname) else (T.F32, T.F16))
            elif role == "tq2_0":
                out[tname] = (pname, role, m_k, (T.TQ2_0,))
            elif role == "packed":
                out[tname] = (pname, role, (m_k[0], m_k[1] // 4), (T.I8,))
            else:
                out[tname] = (pname, role, (m_k[0], m_k[1] // G), (T.F32,))
    return out


def _cross_check_with_gguf_reader(path, header: _Header) -> None:
    """Open the file with ``gguf.GGUFReader`` too and require the same tensor table as the scan."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path, "r")
        tensors = {t.name: t for t in reader.tensors}
        if reader.data_offset != header.data_offset or set(tensors) != set(header.tensors):
            raise ValueError("its tensor table differs from the bounded scan")
        for name, info in header.tensors.items():
            t = tensors[name]
            if int(t.tensor_type) != info.ggml_type or t.data_offset != info.offset or t.n_bytes != info.n_bytes:
                raise ValueError(f"it places tensor {name!r} differently from the bounded scan")
        if reader.fields["general.architecture"].contents() != header.kv["general.architecture"].value:
            raise ValueError("it reads a different general.architecture")
    except Exception as exc:  # anything the package raises becomes one sentence
        _fail(path, f"the gguf package reads the file differently ({type(exc).__name__}: {exc})")


_NUMPY_TYPES = {"F32": "<f4", "F16": "<f2", "I8": "i1"}


def _tensor_array(buf, info: _TensorInfo) -> np.ndarray:
    """The tensor's bytes as a fresh numpy array (byte rows for quantized types)."""
    raw = buf[info.offset:info.offset + info.n_bytes]  # bounds proven by the scan
    name = _ggml_name(info.ggml_type)
    if name in _NUMPY_TYPES:
        return np.frombuffer(raw, dtype=_NUMPY_TYPES[name]).reshape(info.shape)
    return np.frombuffer(raw, dtype=np.uint8).reshape(info.shape[:-1] + (-1,))


def _float_data(arr: np.ndarray, info: _TensorInfo, path) -> np.ndarray:
    arr = arr.astype(np.float32)  # a writable copy
    bad = ~np.isfinite(arr)
    if bad.any():
        index = [int(i) for i in np.argwhere(bad)[0]]
        _fail(path, f"tensor {info.name!r} holds a non-finite value ({arr[tuple(index)]}) at index {index}")
    return arr


def read_gguf(path, cross_check: bool = False) -> LoadedModel:
    """Read a ``nanochat-ternary`` or ``bitnet`` GGUF written by this module, validating everything.

    Raises ``GGUFError`` (a ``ValueError``) with one sentence naming the file, the field or
    tensor and the problem: missing/truncated file, wrong magic or version, unknown
    architecture, missing or mistyped metadata, an invalid config, missing/unexpected tensors,
    wrong tensor type or shape, NaN/Inf in float tensors or TQ2_0 scales.

    The metadata and tensor table come from the bounded scan and the data from the same
    mapping. ``cross_check=True`` also parses the file with ``gguf.GGUFReader`` and requires it
    to agree (slow for large vocabularies: the package builds one array view per token).
    """
    path = os.fspath(path)
    with _mapped(path) as (buf, size):
        header = _scan_buffer(buf, size, path)
        config, tokenizer_json, expected = _validate(header, path)
        arrays = {tname: _tensor_array(buf, header.tensors[tname]) for tname in expected}
    if cross_check:
        _cross_check_with_gguf_reader(path, header)
    model = config.model
    floats: dict[str, np.ndarray] = {}
    ternary: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    packed_parts: dict[str, dict[str, np.ndarray]] = {}
    for tname, (pname, role, shape, _) in expected.items():
        arr, info = arrays.pop(tname), header.tensors[tname]
        if role == "float":
            floats[pname] = _float_data(arr, info, path)
        elif role == "tq2_0":
            ternary[pname] = _tq2_0_to_packed(arr, shape[0], shape[1], model.group_size, f"{path}: tensor {tname!r}")
        elif role == "packed":
            packed_parts.setdefault(pname, {})["packed"] = arr.view(np.uint8).copy()
        else:
            packed_parts.setdefault(pname, {})["scales"] = _float_data(arr, info, path)
    for pname, parts in packed_parts.items():
        ternary[pname] = (parts["packed"], parts["scales"])
    return LoadedModel(config=config, floats=floats, ternary=ternary, tokenizer_json=tokenizer_json, source=path)


def _validate(header: _Header, path):
    """Config, tokenizer JSON and the expected tensor table, each checked against the file."""
    arch = _require(header, "general.architecture", ("str",), path)
    if arch not in ARCHITECTURES:
        _fail(path, f"architecture {arch!r} is not supported (this reader knows {ARCH!r} and {BITNET_ARCH!r})")
    config = _config_from_metadata(header, path)
    model = config.model
    encoding = _require(header, ARCH + ".ternary_encoding", ("str",), path)
    if encoding != ternary_encoding(model):
        _fail(path, f"metadata key '{ARCH}.ternary_encoding' is {encoding!r}, but group_size = {model.group_size} "
                    f"is stored as {ternary_encoding(model)!r}")
    _check_tensor_budget(model, len(header.tensors), path)
    if arch == BITNET_ARCH:
        _check_bitnet_metadata(header, model, path)
    tokenizer_json = _tokenizer_from_metadata(header, model, path)

    expected = _expected_tensors(model, arch)
    for tname in expected:
        if tname not in header.tensors:
            _fail(path, f"tensor {tname!r} is missing (the config needs {len(expected)} tensors, "
                        f"the file has {len(header.tensors)})")
    for tname in header.tensors:
        if tname not in expected:
            _fail(path, f"tensor {tname!r} is not part of a {arch} model with this config")
    for tname, (pname, role, shape, types) in expected.items():
        info = header.tensors[tname]
        if info.ggml_type not in types:
            _fail(path, f"tensor {tname!r} has type {_ggml_name(info.ggml_type)}, expected "
                        f"{' or '.join(t.name for t in types)}")
        if info.shape != shape:
            _fail(path, f"tensor {tname!r} has shape {list(info.shape)}, expected {list(shape)} for this config")
    return config, tokenizer_json, expected
