"""GGUF export (SPEC sections 2, 3, 8, 9; layout in ``docs/gguf.md``); the reader is
``nanochat.io.gguf_read``.

    loaded = loaded_from_checkpoint("runs/tiny/checkpoints/step-000400")
    write_loaded("model.gguf", loaded)                       # or write_gguf(path, cfg, params, tok_json)
    model = read_gguf("model.gguf")                          # nanochat.io.gguf_read: LoadedModel, or GGUFError

A ``LoadedModel`` is what the inference engine runs: the config, float tensors by parameter
name (float32) and BitLinear weights as ``(packed uint8 [M, K/4], scales float32 [M, K/G])``
in the canonical encoding of SPEC section 2.

Two architectures are written:

- ``nanochat-ternary`` (every config): tensors keep the model's parameter names; every
  ``ModelConfig`` field is a ``nanochat-ternary.<field>`` key. Ternary weights are llama.cpp
  ``TQ2_0`` when ``group_size`` is a multiple of 256 (lossless: one fp16 block scale per 256
  weights), else the canonical packed bytes as an ``I8`` tensor plus an ``F32`` tensor
  ``<name>.scales`` (``nanochat-ternary.ternary_encoding`` says which).
- ``bitnet`` (plain configs only): llama.cpp's tensor names and ``bitnet.*`` keys, ``TQ2_0``
  weights; the ``nanochat-ternary.*`` keys ride along so that this reader restores the exact config.

The reader (``nanochat.io.gguf_read``) trusts nothing in the file; see its docstring.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from nanochat.config import Config, ModelConfig
from nanochat.io.atomic import atomic_path
from nanochat.model.params import ParamSpec, parameter_specs, ternary_names
from reference import mhc as mhc_ref
from reference.ternary import pack_ternary, quantize_weights, unpack_ternary

__all__ = [
    "ARCH",
    "BITNET_ARCH",
    "GGUFError",
    "LoadedModel",
    "ParamSpec",
    "WriteSummary",
    "bitnet_problems",
    "gguf_tensor_names",
    "loaded_from_checkpoint",
    "mhc_records",
    "parameter_specs",
    "quantize_params",
    "ternary_param_names",
    "write_gguf",
    "write_loaded",
]

ARCH = "nanochat-ternary"
BITNET_ARCH = "bitnet"
ARCHITECTURES = (ARCH, BITNET_ARCH)
FORMAT_VERSION = 1                 # nanochat-ternary.format_version: bump on any layout change
ENCODING_TQ2_0 = "tq2_0"           # ternary weights as llama.cpp TQ2_0 blocks
ENCODING_PACKED = "packed_i8"      # canonical packed bytes (I8) + F32 "<name>.scales"
SCALES_SUFFIX = ".scales"
TQ2_0_BLOCK = 256                  # weights per TQ2_0 block (one fp16 scale each)
TQ2_0_BLOCK_BYTES = 66             # 64 bytes of 2-bit codes + fp16 d
FLOAT_TYPES = ("f32", "f16")
MAX_TENSOR_NAME_BYTES = 63         # llama.cpp's GGML_MAX_NAME is 64 including the NUL
# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5


class GGUFError(ValueError):
    """A GGUF file (or export request) that cannot be used, told in one sentence."""


# --- the parameter layout ---------------------------------------------------------------------


def _model_cfg(cfg) -> ModelConfig:
    if isinstance(cfg, Config):
        return cfg.model
    if isinstance(cfg, ModelConfig):
        return cfg
    raise TypeError(f"expected a Config or ModelConfig, got {type(cfg).__name__}")


def ternary_param_names(cfg) -> list[str]:
    """Names of the BitLinear weights (the parameters the model runs through ``ternary_linear``)."""
    return ternary_names(_model_cfg(cfg))


def _is_mhc(name: str) -> bool:
    return ".mhc_attn." in name or ".mhc_ffn." in name


def ternary_encoding(cfg) -> str:
    """``tq2_0`` when the group size is a multiple of the TQ2_0 block, else ``packed_i8``."""
    return ENCODING_TQ2_0 if _model_cfg(cfg).group_size % TQ2_0_BLOCK == 0 else ENCODING_PACKED


# --- bitnet naming ----------------------------------------------------------------------------

def bitnet_problems(cfg) -> list[str]:
    """Why ``cfg`` cannot be written as llama.cpp's ``bitnet`` architecture (empty when it can)."""
    c = _model_cfg(cfg)
    problems = []
    if c.n_streams != 1:
        problems.append(f"n_streams = {c.n_streams} (bitnet has a plain residual, needs 1)")
    if c.deltanet_layer_ids:
        problems.append(f"DeltaNet blocks {list(c.deltanet_layer_ids)} (bitnet is attention only)")
    if c.n_experts:
        problems.append(f"n_experts = {c.n_experts} (bitnet has no MoE, needs 0)")
    if not c.sub_norm:
        problems.append("sub_norm = false (bitnet has SubLN norms, needs true)")
    if c.mtp_n_tokens:
        problems.append(f"mtp_n_tokens = {c.mtp_n_tokens} (bitnet has no MTP heads, needs 0)")
    if not c.tie_embeddings:
        problems.append("tie_embeddings = false (bitnet's LM head is the token embedding, needs true)")
    if c.ffn_type != "swiglu":
        problems.append(f"ffn_type = {c.ffn_type!r} (bitnet's FFN is SwiGLU)")
    if c.group_size % TQ2_0_BLOCK:
        problems.append(f"group_size = {c.group_size} (bitnet needs TQ2_0 weights, so a multiple of 256)")
    return problems


def gguf_tensor_names(cfg, arch: str = ARCH) -> dict[str, list[tuple[str, str]]]:
    """Per parameter, the GGUF tensors that hold it as ``(gguf name, role)``.

    Roles: ``float`` (F32/F16), ``tq2_0`` (TQ2_0 weight), ``packed`` (I8 canonical bytes) and
    ``scales`` (F32 per-group scales of a packed weight).
    """
    c = _model_cfg(cfg)
    encoding = ternary_encoding(c)
    out = {}
    for name, spec in parameter_specs(c).items():
        tname = spec.bitnet if arch == BITNET_ARCH else name
        if not spec.ternary:
            out[name] = [(tname, "float")]
        elif encoding == ENCODING_TQ2_0:
            out[name] = [(tname, "tq2_0")]
        else:
            out[name] = [(tname, "packed"), (tname + SCALES_SUFFIX, "scales")]
    return out


# --- the in-memory model ----------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready for inference: what ``read_gguf`` and ``loaded_from_checkpoint`` return."""

    config: Config                                       # model section exact; others default (GGUF)
    floats: dict[str, np.ndarray]                        # float32 tensors by parameter name
    ternary: dict[str, tuple[np.ndarray, np.ndarray]]    # name -> (packed uint8 [M, K/4], scales f32 [M, K/G])
    tokenizer_json: str | None                           # HF tokenizers JSON, or None
    source: str                                          # file or directory, for messages


@dataclass
class WriteSummary:
    """What a GGUF write produced (the export CLI prints it)."""

    path: str
    arch: str
    n_tensors: int
    n_bytes: int
    tensor_types: dict[str, int] = field(default_factory=dict)   # GGML type name -> tensor count
    ternary_encoding: str = ENCODING_TQ2_0


def _host_array(value) -> np.ndarray:
    """A numpy array from a numpy/cupy array or an autograd Tensor."""
    if type(value).__name__ == "Tensor" and hasattr(value, "data"):
        value = value.data
    if hasattr(value, "get") and not isinstance(value, np.ndarray):
        value = value.get()
    return np.asarray(value)


def quantize_params(cfg, params: Mapping[str, Any], tokenizer_json: str | None = None,
                    source: str = "parameters") -> LoadedModel:
    """Quantize float shadow weights into a ``LoadedModel`` (the training forward's exact weights).

    ``params`` maps every parameter name of ``parameter_specs(cfg)`` to a float array (numpy,
    cupy or Tensor). BitLinear weights go through ``quantize_weights`` + ``pack_ternary``; the
    rest become float32. Raises ``ValueError`` naming the parameter on a missing, extra,
    misshaped or non-finite one.
    """
    config = cfg if isinstance(cfg, Config) else Config(model=_model_cfg(cfg))
    model = config.model
    specs = parameter_specs(model)
    extra = [n for n in params if n not in specs]
    if extra:
        raise ValueError(f"{source}: parameter {extra[0]} is not part of the model for this config "
                         f"({len(extra)} unexpected in all)")
    floats, ternary = {}, {}
    for name, spec in specs.items():
        if name not in params:
            raise ValueError(f"{source}: parameter {name} is missing (expected shape {list(spec.shape)})")
        arr = _host_array(params[name])
        if arr.dtype.kind != "f":
            raise ValueError(f"{source}: parameter {name} has dtype {arr.dtype}, expected a float array")
        if arr.shape != spec.shape:
            raise ValueError(f"{source}: parameter {name} has shape {list(arr.shape)}, expected {list(spec.shape)}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{source}: parameter {name} holds non-finite values")
        if spec.ternary:
            q, s = quantize_weights(arr, model.group_size)
            ternary[name] = (pack_ternary(q), np.asarray(s, dtype=np.float32))
        else:
            floats[name] = np.array(arr, dtype=np.float32)
    return LoadedModel(config=config, floats=floats, ternary=ternary, tokenizer_json=tokenizer_json, source=source)


def mhc_records(loaded: LoadedModel) -> list[dict[str, np.ndarray]]:
    """Static mHC parameters per sub-layer in ``.mhc`` order (blk0.attn, blk0.ffn, blk1.attn, ...)."""
    c = loaded.config.model
    if c.n_streams == 1:
        return []
    names = mhc_ref.STATIC_PARAM_NAMES[c.n_streams]
    return [
        {k: loaded.floats[f"layers.{i}.{sub}.{k}"] for k in names}
        for i in range(c.n_layers)
        for sub in ("mhc_attn", "mhc_ffn")
    ]


# --- writing ----------------------------------------------------------------------------------


def _gguf():
    import gguf  # imported lazily: only export and GGUF loading need it

    return gguf


def _writer_class():
    gguf = _gguf()

    class _Writer(gguf.GGUFWriter):
        """GGUFWriter that can also write empty arrays (valid GGUF; gguf-py refuses them)."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)

    return _Writer


def write_gguf(path, cfg, params: Mapping[str, Any], tokenizer_json: str | None, arch: str = ARCH, *,
               float_type: str = "f32", name: str | None = None) -> WriteSummary:
    """Quantize ``params`` (float shadow weights by name) and write a GGUF file atomically."""
    loaded = quantize_params(cfg, params, tokenizer_json, source=str(path))
    return write_loaded(path, loaded, arch=arch, float_type=float_type, name=name)


def write_loaded(path, loaded: LoadedModel, arch: str = ARCH, *, float_type: str = "f32",
                 name: str | None = None, label: str | None = None) -> WriteSummary:
    """Write a ``LoadedModel`` as GGUF (temporary file, then ``os.replace``: never a partial file).

    ``float_type="f16"`` stores 2-D float tensors other than mHC as F16 (lossy); 1-D tensors
    and mHC stay F32. Raises ``ValueError`` (messages start with ``label``, default the path)
    for an unknown arch, a config the ``bitnet`` architecture cannot express, or inconsistent
    tensors.
    """
    gguf = _gguf()
    path = Path(path)
    where = label if label is not None else str(path)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}: unknown architecture {arch!r}; choose {ARCH!r} or {BITNET_ARCH!r}")
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"{where}: float_type must be one of {FLOAT_TYPES}, got {float_type!r}")
    model = loaded.config.model
    if arch == BITNET_ARCH:
        problems = bitnet_problems(model)
        if problems:
            raise ValueError(f"{where}: the bitnet architecture cannot express this config: {'; '.join(problems)}")
    tensors = _tensors_to_write(loaded, arch, float_type, where)
    tokenizer = _tokenizer_metadata(loaded.tokenizer_json, model.vocab_size, where)

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        writer = _writer_class()(tmp, arch)
        try:
            _add_metadata(writer, gguf, loaded, arch, name, tokenizer, any(t[2] == "TQ2_0" for t in tensors))
            for tname, data, type_name in tensors:
                raw_dtype = gguf.GGMLQuantizationType.TQ2_0 if type_name == "TQ2_0" else None
                writer.add_tensor(tname, data, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    counts: dict[str, int] = {}
    for _, _, type_name in tensors:
        counts[type_name] = counts.get(type_name, 0) + 1
    return WriteSummary(str(path), arch, len(tensors), path.stat().st_size, counts, ternary_encoding(model))


def _tensors_to_write(loaded: LoadedModel, arch: str, float_type: str, path) -> list[tuple[str, np.ndarray, str]]:
    """``(gguf name, array, GGML type name)`` for every tensor, checked against the config."""
    model = loaded.config.model
    specs = parameter_specs(model)
    have = set(loaded.floats) | set(loaded.ternary)
    extra = sorted(have - set(specs))
    if extra:
        raise ValueError(f"{path}: tensor {extra[0]} is not a parameter of this config")
    out = []
    for pname, entries in gguf_tensor_names(model, arch).items():
        spec = specs[pname]
        for tname, role in entries:
            if len(tname.encode()) > MAX_TENSOR_NAME_BYTES:
                raise ValueError(f"{path}: tensor name {tname!r} is longer than {MAX_TENSOR_NAME_BYTES} bytes")
        if not spec.ternary:
            arr = loaded.floats.get(pname)
            if arr is None:
                raise ValueError(f"{path}: float parameter {pname} is missing")
            arr = np.asarray(arr)
            if arr.shape != spec.shape or arr.dtype.kind != "f":
                raise ValueError(f"{path}: float parameter {pname} has dtype {arr.dtype} shape {list(arr.shape)}, "
                                 f"expected float {list(spec.shape)}")
            if not np.isfinite(arr).all():
                raise ValueError(f"{path}: float parameter {pname} holds non-finite values")
            if float_type == "f16" and arr.ndim == 2 and not _is_mhc(pname):
                half = arr.astype(np.float16)
                if not np.isfinite(half).all():
                    raise ValueError(f"{path}: float parameter {pname} overflows float16; export it as f32")
                out.append((entries[0][0], half, "F16"))
            else:
                out.append((entries[0][0], np.ascontiguousarray(arr, dtype=np.float32), "F32"))
            continue
        packed, scales = _checked_ternary(loaded, pname, spec, model.group_size, path)
        if entries[0][1] == "tq2_0":
            out.append((entries[0][0], tq2_0_from_packed(packed, scales, model.group_size), "TQ2_0"))
        else:
            out.append((entries[0][0], packed.view(np.int8), "I8"))
            out.append((entries[1][0], scales, "F32"))
    return out


def _checked_ternary(loaded, pname, spec, group_size, path):
    if pname not in loaded.ternary:
        raise ValueError(f"{path}: ternary parameter {pname} is missing")
    packed, scales = (np.asarray(a) for a in loaded.ternary[pname])
    m, k = spec.shape
    if packed.dtype != np.uint8 or packed.shape != (m, k // 4):
        raise ValueError(f"{path}: packed weight {pname} has dtype {packed.dtype} shape {list(packed.shape)}, "
                         f"expected uint8 {[m, k // 4]}")
    if scales.dtype.kind != "f" or scales.shape != (m, k // group_size):
        raise ValueError(f"{path}: scales of {pname} have dtype {scales.dtype} shape {list(scales.shape)}, "
                         f"expected float32 {[m, k // group_size]}")
    scales = np.ascontiguousarray(scales, dtype=np.float32)
    if not np.isfinite(scales).all():
        raise ValueError(f"{path}: scales of {pname} hold non-finite values")
    return np.ascontiguousarray(packed), scales


def tq2_0_from_packed(packed: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """Canonical packed trits + per-group scales -> TQ2_0 bytes ``uint8 [M, K/256 * 66]``.

    A TQ2_0 block holds 256 weights as 2-bit codes ``q + 1`` (0, 1, 2) followed by an fp16 scale
    ``d``: byte ``32h + l`` of the 64 code bytes holds the weights ``128h + 32j + l`` (j = 0..3)
    in bits ``2j..2j+1``. Each block takes the scale of the group it lies in, so the conversion is
    lossless exactly when the scales are fp16 values (``quantize_weights`` guarantees it).
    """
    q = unpack_ternary(packed)
    m, k = q.shape
    if k % TQ2_0_BLOCK or group_size % TQ2_0_BLOCK:
        raise ValueError(f"TQ2_0 needs K = {k} and group_size = {group_size} to be multiples of {TQ2_0_BLOCK}")
    half = scales.astype(np.float16)
    if not np.array_equal(half.astype(np.float32), scales.astype(np.float32)):
        raise ValueError("TQ2_0 export: a weight scale is not exactly representable in float16")
    n_blocks = m * (k // TQ2_0_BLOCK)
    codes = (q.astype(np.int16) + 1).astype(np.uint8).reshape(n_blocks, 2, 4, 32)
    qs = codes[:, :, 0] | (codes[:, :, 1] << 2) | (codes[:, :, 2] << 4) | (codes[:, :, 3] << 6)
    d = np.repeat(half, group_size // TQ2_0_BLOCK, axis=1).reshape(n_blocks, 1).view(np.uint8)
    return np.concatenate([qs.reshape(n_blocks, 64), d], axis=1).reshape(m, -1)


def _tq2_0_to_packed(raw: np.ndarray, m: int, k: int, group_size: int, where: str):
    """Inverse of ``tq2_0_from_packed``; rejects the unused code 3 and non-finite or uneven scales."""
    n_blocks = m * (k // TQ2_0_BLOCK)
    blocks = np.asarray(raw, dtype=np.uint8).reshape(n_blocks, TQ2_0_BLOCK_BYTES)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = (blocks[:, :64].reshape(n_blocks, 2, 1, 32) >> shifts) & np.uint8(3)
    if (codes == 3).any():
        block = int(np.argwhere((codes == 3).reshape(n_blocks, -1).any(axis=1))[0, 0])
        raise GGUFError(f"{where} holds the unused TQ2_0 code 3 (weight value +2) in block {block}, "
                        "so it is not a ternary weight")
    q = (codes.astype(np.int8) - np.int8(1)).reshape(m, k)
    d = np.ascontiguousarray(blocks[:, 64:]).view(np.float16).reshape(m, k // TQ2_0_BLOCK).astype(np.float32)
    if not np.isfinite(d).all():
        raise GGUFError(f"{where} has a non-finite TQ2_0 block scale")
    per_group = d.reshape(m, k // group_size, group_size // TQ2_0_BLOCK)
    if (per_group != per_group[:, :, :1]).any():
        raise GGUFError(f"{where} has different TQ2_0 block scales inside one group of {group_size} weights")
    return pack_ternary(q), np.ascontiguousarray(per_group[:, :, 0])


def _tokenizer_metadata(tokenizer_json, vocab_size, path):
    """Token list (padded to the model's vocab), types, merges and EOT id for ``tokenizer.ggml.*``."""
    if tokenizer_json is None:
        return None
    from nanochat.data.tokenizer import Tokenizer

    if not isinstance(tokenizer_json, str):
        raise ValueError(f"{path}: tokenizer_json must be a string, got {type(tokenizer_json).__name__}")
    tok = Tokenizer.from_json_str(tokenizer_json, source=f"{path}: tokenizer")
    tokens = tok.vocab_list
    if len(tokens) > vocab_size:
        raise ValueError(f"{path}: the tokenizer has {len(tokens)} tokens but model.vocab_size is {vocab_size}")
    types = [TOKEN_CONTROL if tok.is_special(i) else TOKEN_NORMAL for i in range(len(tokens))]
    # Rows of the embedding beyond the tokenizer are never produced; llama.cpp wants one token per row.
    pad = range(len(tokens), vocab_size)
    return {
        "tokens": tokens + [f"[PAD{i}]" for i in pad],
        "types": types + [TOKEN_UNUSED] * len(pad),
        "merges": tok.merge_strings(),
        "eot": tok.eot_id,
        "json": tokenizer_json,
    }


def _config_keys(model: ModelConfig):
    """``(field name, value, spec kind)`` for every ModelConfig field."""
    return [(f.name, getattr(model, f.name), f.metadata["spec"].kind) for f in fields(ModelConfig)]


def _add_metadata(writer, gguf, loaded, arch, name, tokenizer, has_tq2_0):
    V = gguf.GGUFValueType
    model = loaded.config.model
    writer.add_name(name or ARCH)
    if has_tq2_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0)
    p = ARCH + "."
    writer.add_uint32(p + "format_version", FORMAT_VERSION)
    writer.add_string(p + "ternary_encoding", ternary_encoding(model))
    for key, value, kind in _config_keys(model):
        if kind == "bool":
            writer.add_bool(p + key, bool(value))
        elif kind == "int":
            writer.add_int64(p + key, int(value))
        elif kind == "float":
            writer.add_float64(p + key, float(value))
        elif kind == "str" or (kind == "layers" and isinstance(value, str)):
            writer.add_key_value(p + key, value, V.STRING)
        else:  # int_list, or a layers list
            writer.add_key_value(p + key, [int(v) for v in value], V.ARRAY, sub_type=V.INT64)
    if arch == BITNET_ARCH:
        b = BITNET_ARCH + "."
        for key, value in _bitnet_hparams(model).items():
            if isinstance(value, float):
                writer.add_float32(b + key, value)
            else:
                writer.add_uint32(b + key, value)
    if tokenizer is not None:
        writer.add_string(p + "tokenizer_json", tokenizer["json"])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_key_value("tokenizer.ggml.tokens", tokenizer["tokens"], V.ARRAY, sub_type=V.STRING)
        writer.add_key_value("tokenizer.ggml.token_type", tokenizer["types"], V.ARRAY, sub_type=V.INT32)
        writer.add_key_value("tokenizer.ggml.merges", tokenizer["merges"], V.ARRAY, sub_type=V.STRING)
        writer.add_bos_token_id(tokenizer["eot"])
        writer.add_eos_token_id(tokenizer["eot"])
        writer.add_eot_token_id(tokenizer["eot"])
        writer.add_add_bos_token(False)


def _bitnet_hparams(model: ModelConfig) -> dict[str, int | float]:
    """The ``bitnet.*`` hyper-parameters llama.cpp reads (float values are float32 keys)."""
    return {
        "vocab_size": model.vocab_size,
        "context_length": model.seq_len,
        "embedding_length": model.dim,
        "block_count": model.n_layers,
        "feed_forward_length": model.ffn_hidden,
        "attention.head_count": model.n_heads,
        "attention.head_count_kv": model.n_kv_heads,
        "attention.layer_norm_rms_epsilon": float(model.norm_eps),
        "rope.freq_base": float(model.rope_theta),
        "rope.dimension_count": model.head_dim,
    }


# --- checkpoints ----------------------------------------------------------------------------------


def loaded_from_checkpoint(ckpt_dir) -> LoadedModel:
    """A ``LoadedModel`` from a training checkpoint (a step directory or a run directory).

    BitLinear shadow weights are quantized exactly as the training forward does
    (``quantize_weights`` then ``pack_ternary``). Raises ``ValueError`` (``CheckpointError``,
    ``ConfigError``) naming the directory and the problem.
    """
    from nanochat.io.checkpoint import load_checkpoint

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    ck = load_checkpoint(ckpt_dir)
    where = Path(ck["path"])
    try:
        raw = tomllib.loads(ck["config_toml"])
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where / 'config.toml'}: invalid TOML ({exc})") from None
    config = Config.from_dict(raw, source=f"checkpoint config {where / 'config.toml'}")
    tokenizer_json = None
    if ck.get("tokenizer_path") is not None:
        try:
            tokenizer_json = Path(ck["tokenizer_path"]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{ck['tokenizer_path']}: the tokenizer cannot be read ({exc})") from None
    loaded = quantize_params(config, ck["params"], tokenizer_json, source=f"checkpoint {where}")
    loaded.source = str(where)
    return loaded
