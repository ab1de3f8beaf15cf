"""Run configuration: typed TOML sections, shipped presets, strict validation, parameter counts.

A config has four sections, ``[model]``, ``[optim]``, ``[train]`` and ``[data]``, each a frozen
dataclass whose fields are flat TOML keys (every key is documented in ``docs/config.md``).

    cfg = load_config("tiny", overrides=["model.dim=512", "steps=100"])
    cfg.model.head_dim, cfg.to_toml(), Config.from_dict(cfg.to_dict()) == cfg

``load_config`` resolves a preset name (``nanochat/presets/NAME.toml``, shipped as package
data) or a path ending in ``.toml``; a file may start with ``base = "NAME"`` (or a ``.toml``
path, relative to the file) to inherit every value it does not set. Overrides are
``section.key=value`` strings (a bare ``key`` when only one section has it) whose value is read
as a TOML value, falling back to a plain string (``mhc_mode=static``).

Every problem is a ``ConfigError`` (a ``ValueError``) whose message is one sentence naming the
source (preset, file or ``--set``), the field and what is wrong, with the closest valid names
for an unknown key and the offending values for an inconsistent pair.

``count_parameters(model_cfg)`` counts parameters per component from the shapes alone, so a
3B preset can be checked without allocating it.
"""
from __future__ import annotations

import difflib
import math
import re
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import backends
from nanochat.model.params import COMPONENTS as PARAMETER_COMPONENTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "PARAMETER_COMPONENTS",
    "available_presets",
    "config_keys",
    "count_parameters",
    "load_config",
]

PRESET_PACKAGE = "nanochat"
PRESET_DIR = "presets"
MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; refuse to read anything huge
MAX_BASE_DEPTH = 16
DEFAULT_PRESET = "tiny"
DEFAULT_SOURCE = "the built-in defaults"


# Size bounds (docs/limits.md): what the formats and the code paths allow, far above any model
# this project trains, so that a typo (dim = 10**9) is one sentence and never an allocation.
# Whether a config in range fits this machine is nanochat.train.budget's memory estimate.
MAX_VOCAB = 1 << 20        # the tokenizer's MAX_VOCAB_SIZE
MAX_WIDTH = 1 << 16        # dim, GaLore sizes
MAX_HIDDEN = 1 << 18       # ffn_hidden, moe_hidden
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12     # DeltaNet d_k / d_v / chunk
MAX_LAYERS = 4096          # .mhc holds at most 10000 sub-layers (2 per block)
MAX_EXPERTS = 1024
MAX_SEQ_LEN = 1 << 20
MAX_BATCH = 1 << 16        # batch_size, grad_accum, eval_batches
MAX_STEPS = 10**9          # steps and step intervals: checkpoint directory names stay <= 10 digits


class ConfigError(ValueError):
    """A configuration problem, told in one sentence that names the source and the field."""


# --- declaring keys ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """How one key is typed and bounded; ``help`` is its one-line meaning for the docs."""

    kind: str  # bool | int | float | str | int_list | float_pair | layers
    help: str
    choices: tuple = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None


def _key(default, help, *, kind=None, **limits):
    if kind is None:
        kind = {bool: "bool", int: "int", float: "float", str: "str"}[type(default)]
    return field(default=default, metadata={"spec": _Spec(kind, help, **limits)})


LAYER_PATTERNS = ("every", "every_other")
BACKEND_CHOICES = ("auto", *backends.registered())


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the network's shape and its optional parts (MoE, DeltaNet, mHC, MTP)."""

    vocab_size: int = _key(4096, "Vocabulary size; the byte-level BPE tokenizer is trained to this size.", ge=257, le=MAX_VOCAB)
    dim: int = _key(256, "Model width C (embedding and residual size).", ge=1, le=MAX_WIDTH)
    n_layers: int = _key(4, "Number of transformer blocks.", ge=1, le=MAX_LAYERS)
    n_heads: int = _key(4, "Query heads; head_dim = dim / n_heads.", ge=1, le=MAX_HEADS)
    n_kv_heads: int = _key(4, "Key/value heads (grouped-query attention); must divide n_heads.", ge=1, le=MAX_HEADS)
    ffn_hidden: int = _key(768, "Hidden size of the dense FFN; a multiple of group_size.", ge=1, le=MAX_HIDDEN)
    ffn_type: str = _key("swiglu", "FFN gate: `swiglu` = down(silu(gate x) * up x), `relu2` = down(relu(gate x)^2 * up x).",
                         choices=("swiglu", "relu2"))
    group_size: int = _key(256, "Ternary quantisation group G (columns per weight scale); 256 keeps GGUF TQ2_0 lossless.",
                           choices=(64, 128, 256))
    seq_len: int = _key(256, "Training context length T in tokens.", ge=1, le=MAX_SEQ_LEN)
    rope_theta: float = _key(10000.0, "RoPE base theta.", gt=0)
    norm_eps: float = _key(1e-6, "RMSNorm epsilon.", gt=0, lt=1)
    init_std: float = _key(0.02, "Standard deviation of the normal init of the embedding (and float weights).", gt=0)
    sub_norm: bool = _key(False, "BitNet SubLN: an extra RMSNorm before the attention output and before the FFN down projection.")
    tie_embeddings: bool = _key(True, "Share the token embedding with the LM head.")
    n_streams: int = _key(1, "mHC residual streams: 1 = plain pre-norm residual, 2 or 4 = mHC.", choices=(1, 2, 4))
    mhc_mode: str = _key("dynamic", "mHC coefficients: `static` (learned per sub-layer) or `dynamic` (mHC-lite, per token).",
                         choices=("static", "dynamic"))
    n_experts: int = _key(0, "MoE experts per MoE layer; 0 = dense FFN everywhere.", ge=0, le=MAX_EXPERTS)
    moe_top_k: int = _key(2, "Experts each token is routed to (softmax over the selected logits); at most n_experts.", ge=1, le=MAX_EXPERTS)
    moe_hidden: int = _key(0, "Hidden size of each expert (and the shared expert); 0 = ffn_hidden.", ge=0, le=MAX_HIDDEN)
    moe_shared_expert: bool = _key(False, "Add an always-on shared expert to every MoE layer.")
    moe_aux_loss_weight: float = _key(0.01, "Weight of the Switch-style load-balancing loss.", ge=0)
    moe_layers: Any = _key("every", "Which blocks use MoE: `every`, `every_other` (odd indices 1, 3, ...) or a list of 0-based indices.",
                           kind="layers")
    deltanet_ratio: float = _key(0.0, "Fraction of blocks whose attention is replaced by Gated DeltaNet (placed evenly, see docs).",
                                 ge=0, le=1)
    deltanet_layers: tuple = _key((), "Explicit 0-based DeltaNet block indices (instead of deltanet_ratio).", kind="int_list")
    deltanet_heads: int = _key(0, "DeltaNet heads; 0 = n_heads.", ge=0, le=MAX_HEADS)
    deltanet_key_dim: int = _key(0, "DeltaNet key/query dim per head d_k; 0 = head_dim.", ge=0, le=MAX_HEAD_DIM)
    deltanet_value_dim: int = _key(0, "DeltaNet value dim per head d_v; 0 = head_dim.", ge=0, le=MAX_HEAD_DIM)
    deltanet_chunk_size: int = _key(64, "Chunk length of the chunkwise-parallel DeltaNet form.", ge=1, le=MAX_HEAD_DIM)
    mtp_n_tokens: int = _key(0, "Multi-token-prediction heads; head i predicts token t + 2 + i with weight 0.5^i.", ge=0, le=16)
    mtp_weight: float = _key(0.2, "Weight of the summed MTP loss added to the main loss.", ge=0)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def expert_hidden(self) -> int:
        return self.moe_hidden or self.ffn_hidden

    @property
    def dn_heads(self) -> int:
        return self.deltanet_heads or self.n_heads

    @property
    def dn_key_dim(self) -> int:
        return self.deltanet_key_dim or self.head_dim

    @property
    def dn_value_dim(self) -> int:
        return self.deltanet_value_dim or self.head_dim

    @property
    def deltanet_layer_ids(self) -> tuple[int, ...]:
        """Sorted DeltaNet block indices: the explicit list, or ``round(ratio * n_layers)`` spread evenly.

        The first and last blocks stay attention. With ``n`` blocks chosen out of ``L``, block ``k``
        sits at ``1 + floor((k + 1/2) (L - 2) / n)``: the centre of the k-th of n equal slices of
        the interior blocks 1..L-2 (24 layers at 0.2 -> 3, 7, 12, 16, 20). A ratio that leaves
        a single attention block (n = L - 1) keeps block 0; n = L makes every block DeltaNet.
        """
        if self.deltanet_layers:
            return tuple(sorted(self.deltanet_layers))
        n, layers = _deltanet_count(self.deltanet_ratio, self.n_layers), self.n_layers
        if n >= layers:
            return tuple(range(layers))
        if n > layers - 2:
            return tuple(range(1, layers))
        return tuple(1 + (2 * k + 1) * (layers - 2) // (2 * n) for k in range(n))

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Sorted MoE block indices (empty when ``n_experts == 0``)."""
        if self.n_experts == 0:
            return ()
        if self.moe_layers == "every":
            return tuple(range(self.n_layers))
        if self.moe_layers == "every_other":
            return tuple(range(1, self.n_layers, 2))
        return tuple(sorted(self.moe_layers))

    def block_kinds(self) -> tuple[tuple[str, str], ...]:
        """Per block ``(mixer, ffn)``: mixer ``attention``/``deltanet``, ffn ``dense``/``moe``."""
        dn, moe = set(self.deltanet_layer_ids), set(self.moe_layer_ids)
        return tuple(
            ("deltanet" if i in dn else "attention", "moe" if i in moe else "dense") for i in range(self.n_layers)
        )


def _deltanet_count(ratio: float, n_layers: int) -> int:
    return int(math.floor(ratio * n_layers + 0.5))


@dataclass(frozen=True)
class OptimConfig:
    """``[optim]``: Muon for 2-D hidden weights, AdamW (or Lion) for the rest, GaLore 2, schedule."""

    muon_lr: float = _key(0.02, "Muon learning rate (all BitLinear shadow weights, DeltaNet and expert projections).", ge=0)
    adamw_lr: float = _key(0.003, "AdamW learning rate for norms, mHC parameters, routers and scalars (Lion: times lion_lr_scale).", ge=0)
    embedding_lr: float = _key(0.01, "AdamW learning rate for the token embedding and the tied LM head (Lion: times lion_lr_scale).", ge=0)
    head_lr: float = _key(0.004, "AdamW learning rate for an untied LM head (Lion: times lion_lr_scale).", ge=0)
    muon_momentum: float = _key(0.95, "Muon momentum beta.", ge=0, lt=1)
    muon_nesterov: bool = _key(True, "Nesterov update u = lerp(g, buf, beta) instead of u = buf.")
    muon_ns_steps: int = _key(5, "Newton-Schulz iterations of the orthogonalisation.", ge=1, le=100)
    muon_adjust_lr: str = _key("original", "Muon step scale: `original` = sqrt(max(1, rows/cols)), `match_rms_adamw` = 0.2 sqrt(max(rows, cols)).",
                               choices=("original", "match_rms_adamw"))
    muon_polar_express: bool = _key(False, "Use the Polar Express per-iteration coefficients instead of the fixed quintic.")
    muon_8bit: bool = _key(False, "Store the Muon momentum as int8 blocks of 256 with one float32 scale each.")
    muon_weight_decay: float = _key(0.0, "Decoupled weight decay of the Muon group (w *= 1 - lr * wd).", ge=0)
    adamw_betas: tuple = _key((0.9, 0.95), "AdamW (beta1, beta2).", kind="float_pair", ge=0, lt=1)
    adamw_eps: float = _key(1e-8, "AdamW epsilon.", gt=0)
    adamw_weight_decay: float = _key(0.0, "Decoupled weight decay of the AdamW/Lion groups.", ge=0)
    scalar_optimizer: str = _key("adamw", "Optimizer of the non-Muon groups: `adamw` or `lion`.", choices=("adamw", "lion"))
    lion_betas: tuple = _key((0.9, 0.99), "Lion (beta1, beta2).", kind="float_pair", ge=0, lt=1)
    lion_lr_scale: float = _key(0.3, "With scalar_optimizer = lion, each of adamw_lr, embedding_lr and head_lr is multiplied by this: Lion's sign update moves every weight by the full rate, so it wants a 3-10x smaller one.",
                                gt=0, le=1)
    galore: bool = _key(False, "GaLore 2: keep the optimizer state of large matrices in a rank-r projected space.")
    galore_rank: int = _key(128, "GaLore projection rank r; at most galore_min_dim.", ge=1, le=MAX_WIDTH)
    galore_update_freq: int = _key(200, "Steps between projector refreshes (randomized SVD of the gradient).", ge=1, le=MAX_STEPS)
    galore_scale: float = _key(1.0, "Scale of the update projected back to full size (1.0 keeps Muon's learning rate meaning; the GaLore paper's 0.25 was tuned for AdamW).", gt=0)
    galore_min_dim: int = _key(256, "Only matrices with min(rows, cols) >= this are projected.", ge=1, le=MAX_WIDTH)
    galore_inner: str = _key("muon", "Optimizer GaLore wraps: `muon` or `adamw`.", choices=("muon", "adamw"))
    galore_oversample: int = _key(8, "Extra columns of the randomized SVD sketch.", ge=0, le=MAX_HEAD_DIM)
    galore_power_iters: int = _key(2, "Power iterations of the randomized SVD.", ge=0, le=100)
    galore_projector_dtype: str = _key("float16", "Storage dtype of the GaLore projectors (`float16` halves their memory; math runs in float32).",
                                       choices=("float16", "float32"))
    grad_clip: float = _key(1.0, "Clip gradients to this global L2 norm; 0 = no clipping.", ge=0)
    warmup_steps: int = _key(20, "Linear warmup steps (step 0 already warms up).", ge=0, le=MAX_STEPS)
    decay_frac: float = _key(0.2, "Fraction of the run (at its end) over which the learning rate decays.", ge=0, le=1)
    min_lr_ratio: float = _key(0.1, "Final learning rate as a fraction of the base rate.", ge=0, le=1)
    decay: str = _key("cosine", "Shape of the decay: `cosine` or `linear`.", choices=("cosine", "linear"))


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: run length, batching, evaluation, logging, checkpoints, loader, backend."""

    steps: int = _key(400, "Optimizer steps.", ge=1, le=MAX_STEPS)
    batch_size: int = _key(8, "Sequences per micro-batch.", ge=1, le=MAX_BATCH)
    grad_accum: int = _key(1, "Micro-batches accumulated per optimizer step.", ge=1, le=MAX_BATCH)
    seed: int = _key(1337, "Seed of the parameter init, data order and sampling.", ge=0, le=2**63 - 2)
    eval_every: int = _key(100, "Steps between validation-loss evaluations; 0 = only at the end.", ge=0, le=MAX_STEPS)
    eval_batches: int = _key(8, "Validation batches per evaluation.", ge=1, le=MAX_BATCH)
    log_every: int = _key(10, "Steps between metric log lines (JSONL and TensorBoard).", ge=1, le=MAX_STEPS)
    checkpoint_every: int = _key(0, "Steps between checkpoints; 0 = only at the end.", ge=0, le=MAX_STEPS)
    keep_last_k: int = _key(2, "Checkpoints kept on disk (older ones are deleted).", ge=1, le=10000)
    max_nonfinite_steps: int = _key(5, "Stop after this many non-finite steps in a row (each is skipped).", ge=1, le=MAX_STEPS)
    collider_sparsity: float = _key(0.0, "Collider: fraction of lowest-loss tokens per sequence filtered from the backward.",
                                    ge=0, lt=1)
    sample_tokens: int = _key(64, "Tokens generated as a sample at the end of the run; 0 = none.", ge=0, le=MAX_SEQ_LEN)
    sample_prompt: str = _key("def ", "Prompt of the end-of-run sample.")
    sample_temperature: float = _key(0.8, "Temperature of the end-of-run sample; 0 = greedy.", ge=0)
    async_loader: bool = _key(True, "Prefetch batches in background workers (same batches as the synchronous loader).")
    loader_workers: int = _key(1, "Background loader workers.", ge=1, le=64)
    loader_prefetch: int = _key(4, "Batches the asynchronous loader queues ahead.", ge=1, le=1024)
    backend: str = _key("auto", "Op backend: `auto` (cupy with a working GPU, else numba), `numpy`, `numba` or `cupy`.",
                        choices=BACKEND_CHOICES)
    dtype: str = _key("float32", "Float dtype of parameters and activations.", choices=("float32", "float64"))
    out_dir: str = _key("", "Run directory; empty = runs/<preset>-<timestamp>.")
    tensorboard: bool = _key(True, "Write TensorBoard event files when tensorboardX is installed.")


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: corpus, tokenizer training and caching."""

    path: str = _key("", "Text file, directory of text files or pre-tokenized .bin; empty = the Python stdlib corpus.")
    val_fraction: float = _key(0.01, "Fraction of documents (by path hash) held out for validation.", gt=0, le=0.5)
    tokenizer_train_bytes: int = _key(0, "Bytes of training text the tokenizer learns from; 0 = all of it.", ge=0, le=1 << 50)
    cache_dir: str = _key("", "Cache for tokenizers and token shards; empty = ~/.cache/nanochat-ternary.")


_SECTIONS: dict[str, type] = {"model": ModelConfig, "optim": OptimConfig, "train": TrainConfig, "data": DataConfig}
_KEYS: dict[str, tuple[str, ...]] = {s: tuple(f.name for f in fields(c)) for s, c in _SECTIONS.items()}


@dataclass(frozen=True)
class Config:
    """A validated run configuration; build it with ``load_config`` or ``Config.from_dict``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict ``{section: {key: value}}`` with lists for tuples (TOML/JSON ready)."""
        return {
            name: {f.name: _plain(getattr(getattr(self, name), f.name)) for f in fields(cls)}
            for name, cls in _SECTIONS.items()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config dict") -> "Config":
        """Validate a nested dict (missing keys take their defaults); errors name ``source``."""
        if not isinstance(data, Mapping):
            _fail(source, f"a config must be a table of sections, got {_describe(data)}")
        layer = _flatten(data, source, allow_base=False)
        return _build(layer, {k: source for k in layer})

    def to_toml(self, header: str | None = None) -> str:
        """The resolved config as a TOML document that ``load_config`` reads back to an equal Config."""
        lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
        for name, values in self.to_dict().items():
            if lines:
                lines.append("")
            lines.append(f"[{name}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        return "\n".join(lines) + "\n"

    def with_overrides(self, overrides: Iterable[str]) -> "Config":
        """A new validated Config with ``section.key=value`` overrides applied."""
        layer = _flatten(self.to_dict(), "the loaded config", allow_base=False)
        sources = dict.fromkeys(layer, "the loaded config")
        _apply_overrides(layer, sources, overrides)
        return _build(layer, sources)


def config_keys() -> list[tuple[str, str, Any, str]]:
    """Every key as ``(section, key, default, meaning)``, in declaration order (for docs and CLIs)."""
    return [
        (name, f.name, _plain(f.default), f.metadata["spec"].help)
        for name, cls in _SECTIONS.items()
        for f in fields(cls)
    ]


# --- loading ---------------------------------------------------------------------------------


def available_presets() -> list[str]:
    """Names of the presets shipped in ``nanochat/presets``."""
    root = resources.files(PRESET_PACKAGE).joinpath(PRESET_DIR)
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def load_config(preset_or_path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a preset name (default ``tiny``) or a ``.toml`` file, apply overrides, validate.

    ``overrides`` are ``section.key=value`` strings (or ``key=value`` when the key is unique
    across sections); values are TOML values, or plain strings when they do not parse as TOML.
    Raises ``ConfigError`` (a ``ValueError``) with a one-sentence message on any problem.
    """
    ref = DEFAULT_PRESET if preset_or_path is None else preset_or_path
    layers = _load_layers(ref, relative_to=None, chain=())
    values: dict[tuple[str, str], Any] = {}
    sources: dict[tuple[str, str], str] = {}
    for layer, label in layers:  # base first, so later files win
        values.update(layer)
        sources.update(dict.fromkeys(layer, label))
    _apply_overrides(values, sources, overrides)
    return _build(values, sources)


def _locate(ref, relative_to):
    """``(readable resource, label, identity)`` for a preset name or a ``.toml`` path."""
    if isinstance(ref, Path) or (isinstance(ref, str) and ref.endswith(".toml")):
        path = Path(ref)
        if not path.is_absolute() and relative_to is not None:
            # a base path is relative to the file naming it (the presets folder for a preset)
            path = relative_to / path if isinstance(relative_to, Path) else relative_to.joinpath(str(path))
        label = f"config file '{path}'"
        if not path.is_file():
            _fail(label, "the file does not exist" if not path.exists() else "the path is not a regular file")
        return path, label, str(path.resolve()) if isinstance(path, Path) else str(path)
    if not isinstance(ref, str):
        _fail("load_config", f"expected a preset name or a .toml path, got {_describe(ref)}")
    label = f"preset '{ref}'"
    names = available_presets()
    if not re.fullmatch(r"[A-Za-z0-9_]+", ref) or ref not in names:
        close = difflib.get_close_matches(ref, names, n=3, cutoff=0.5)
        hint = f"did you mean {_or_list(close)}?" if close else f"the presets are {', '.join(names)}"
        _fail(label, f"no such preset (a file path must end in .toml); {hint}")
    return resources.files(PRESET_PACKAGE).joinpath(PRESET_DIR, f"{ref}.toml"), label, f"preset:{ref}"


def _load_layers(ref, relative_to, chain):
    """Flat ``{(section, key): value}`` layers of ``ref`` and its ``base`` chain, base first."""
    resource, label, identity = _locate(ref, relative_to)
    if identity in (c[0] for c in chain):
        cycle = " -> ".join([c[1] for c in chain] + [label])
        _fail(label, f"the base chain loops back on itself ({cycle})")
    if len(chain) >= MAX_BASE_DEPTH:
        _fail(label, f"the base chain is deeper than {MAX_BASE_DEPTH} files")
    raw = _read_toml(resource, label)
    layer = _flatten(raw, label, allow_base=True)
    base = raw.get("base")
    if base is None:
        return [(layer, label)]
    if not isinstance(base, str) or not base:
        _fail(label, f"base must be a preset name or a .toml path, got {_describe(base)}")
    parent_dir = resource.parent if isinstance(resource, Path) else resources.files(PRESET_PACKAGE).joinpath(PRESET_DIR)
    parents = _load_layers(base, parent_dir if base.endswith(".toml") else None, chain + ((identity, label),))
    return parents + [(layer, label)]


def _read_toml(resource, label) -> dict:
    try:
        data = resource.read_bytes()
    except OSError as exc:
        _fail(label, f"the file cannot be read ({exc.strerror or exc})")
    if len(data) > MAX_CONFIG_BYTES:
        _fail(label, f"the file is {len(data)} bytes, more than the {MAX_CONFIG_BYTES} a config may have")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(label, f"the file is not UTF-8 text (bad byte at offset {exc.start})")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        _fail(label, f"invalid TOML syntax: {str(exc).rstrip('.')}")


def _flatten(raw: Mapping, label: str, allow_base: bool) -> dict[tuple[str, str], Any]:
    """Check sections and key names (values are checked later) and flatten to ``(section, key)``."""
    out = {}
    for section, body in raw.items():
        if section == "base" and allow_base:
            continue
        if section not in _SECTIONS:
            if isinstance(body, Mapping):
                close = difflib.get_close_matches(str(section), list(_SECTIONS), n=2, cutoff=0.5)
                hint = f"did you mean {_or_list(f'[{c}]' for c in close)}?" if close else \
                    f"the sections are {', '.join(f'[{s}]' for s in _SECTIONS)}"
                _fail(label, f"unknown section [{section}]; {hint}")
            tops = ["base"] if allow_base else []
            _fail(label, f"unknown top-level key '{section}'; {_key_hint(None, str(section), extra=tops)}")
        if not isinstance(body, Mapping):
            _fail(label, f"[{section}] must be a table of key = value pairs, got {_describe(body)}")
        for key, value in body.items():
            if key not in _KEYS[section]:
                _fail(label, f"unknown key '{section}.{key}'; {_key_hint(section, str(key))}")
            out[(section, key)] = value
    return out


def _key_hint(section: str | None, key: str, extra: Iterable[str] = ()) -> str:
    """'did you mean ...?' from the same section first, then the same name in other sections."""
    elsewhere = [f"{s}.{key}" for s in _SECTIONS if s != section and key in _KEYS[s]]
    if section is None:  # bare name: compare against bare key names, report them qualified
        bare = {k: f"{s}.{k}" for s in _SECTIONS for k in _KEYS[s]}
        close = [bare[c] for c in difflib.get_close_matches(key, list(bare), n=3, cutoff=0.6)]
        close += [e for e in extra if e in difflib.get_close_matches(key, list(extra), n=1, cutoff=0.6)]
    else:
        close = [f"{section}.{c}" for c in difflib.get_close_matches(key, _KEYS[section], n=3, cutoff=0.6)]
    if section is not None:  # a nested table such as [model.moe]: the keys are flat, moe_*
        prefixed = [f"{section}.{k}" for k in _KEYS[section] if k.startswith(f"{key}_")]
        if prefixed:
            return f"sections are flat, did you mean one of {_or_list(prefixed)}?"
    candidates = list(dict.fromkeys(elsewhere + close))
    if candidates:
        return f"did you mean {_or_list(candidates)}?"
    if section is None:
        return f"keys live in the sections {', '.join(f'[{s}]' for s in _SECTIONS)}"
    return f"the keys of [{section}] are {', '.join(_KEYS[section])}"


def _apply_overrides(values, sources, overrides) -> None:
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        if not isinstance(text, str):
            _fail("--set", f"an override must be a 'key=value' string, got {_describe(text)}")
        label = f"--set {text}"
        name, sep, raw = text.partition("=")
        name = name.strip()
        if not sep or not name:
            _fail(label, "an override must have the form section.key=value, for example model.dim=512")
        key = _resolve_override_key(name, label)
        values[key] = _parse_value(raw.strip())
        sources[key] = label


def _resolve_override_key(name: str, label: str) -> tuple[str, str]:
    if "." in name:
        section, _, key = name.partition(".")
        if section not in _SECTIONS:
            close = difflib.get_close_matches(section, list(_SECTIONS), n=2, cutoff=0.5)
            hint = f"did you mean {_or_list(close)}?" if close else f"the sections are {', '.join(_SECTIONS)}"
            _fail(label, f"unknown section '{section}'; {hint}")
        if key not in _KEYS[section]:
            _fail(label, f"unknown key '{section}.{key}'; {_key_hint(section, key)}")
        return section, key
    owners = [s for s in _SECTIONS if name in _KEYS[s]]
    if not owners:
        _fail(label, f"unknown key '{name}'; {_key_hint(None, name)}")
    if len(owners) > 1:
        _fail(label, f"the key '{name}' exists in several sections; write {_or_list(f'{s}.{name}' for s in owners)}")
    return owners[0], name


def _parse_value(raw: str) -> Any:
    """A TOML value (``512``, ``true``, ``[1, 3]``, ``"x"``), else the text itself as a string."""
    try:
        parsed = tomllib.loads(f"value = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    return parsed["value"] if list(parsed) == ["value"] else raw


# --- validation ------------------------------------------------------------------------------


def _build(values: Mapping[tuple[str, str], Any], sources: Mapping[tuple[str, str], str]) -> Config:
    sections = {}
    for name, cls in _SECTIONS.items():
        kwargs = {}
        for f in fields(cls):
            if (name, f.name) in values:
                kwargs[f.name] = _check_value(values[(name, f.name)], f.metadata["spec"], f"{name}.{f.name}",
                                              sources[(name, f.name)])
        sections[name] = cls(**kwargs)
    cfg = Config(**sections)
    _check_consistency(cfg, lambda *keys: _where(sources, keys))
    return cfg


def _where(sources, keys) -> str:
    labels = list(dict.fromkeys(sources.get(tuple(k.split(".", 1)), DEFAULT_SOURCE) for k in keys))
    if len(labels) > 1 and DEFAULT_SOURCE in labels:  # name what the user wrote, not the defaults
        labels.remove(DEFAULT_SOURCE)
    return " and ".join(labels)


def _check_value(value, spec: _Spec, name: str, source: str):
    """Type-check, convert (lists to tuples, ints to floats) and range-check one value."""
    kind = spec.kind
    if kind == "bool":
        if not isinstance(value, bool):
            _fail(source, f"{name} must be true or false, got {_describe(value)}")
    elif kind == "int":
        if not _is_int(value):
            _fail(source, f"{name} must be an integer, got {_describe(value)}")
        _check_range(value, spec, name, source)
    elif kind == "float":
        value = _as_float(value, name, source)
        _check_range(value, spec, name, source)
    elif kind == "str":
        if not isinstance(value, str):
            _fail(source, f"{name} must be a string, got {_describe(value)}")
        _check_range(value, spec, name, source)
    elif kind == "int_list":
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
            _fail(source, f"{name} must be a list of integers, got {_describe(value)}")
        value = tuple(value)
    elif kind == "float_pair":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            _fail(source, f"{name} must be a list of two numbers, got {_describe(value)}")
        value = tuple(_as_float(v, name, source) for v in value)
        for v in value:
            _check_range(v, spec, name, source)
    elif kind == "layers":
        if isinstance(value, str):
            if value not in LAYER_PATTERNS:
                _fail(source, f"{name} = {_toml_value(value)} is not allowed; use "
                              f"{', '.join(_toml_value(p) for p in LAYER_PATTERNS)} or a list of block indices")
        elif isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
            value = tuple(value)
        else:
            _fail(source, f"{name} must be \"every\", \"every_other\" or a list of integers, got {_describe(value)}")
    return value


def _check_range(value, spec: _Spec, name: str, source: str) -> None:
    shown = _toml_value(value)
    if spec.choices and value not in spec.choices:
        _fail(source, f"{name} = {shown} is not allowed; choose one of {', '.join(_toml_value(c) for c in spec.choices)}")
    if spec.ge is not None and value < spec.ge:
        _fail(source, f"{name} = {shown} is out of range; it must be at least {_num(spec.ge)}")
    if spec.gt is not None and value <= spec.gt:
        _fail(source, f"{name} = {shown} is out of range; it must be greater than {_num(spec.gt)}")
    if spec.le is not None and value > spec.le:
        _fail(source, f"{name} = {shown} is out of range; it must be at most {_num(spec.le)}")
    if spec.lt is not None and value >= spec.lt:
        _fail(source, f"{name} = {shown} is out of range; it must be less than {_num(spec.lt)}")


def _check_consistency(cfg: Config, where) -> None:
    """Relations between keys; each message names both values and why they clash."""
    m = cfg.model
    if m.dim % m.n_heads:
        _fail(where("model.dim", "model.n_heads"),
              f"model.dim = {m.dim} is not divisible by model.n_heads = {m.n_heads}, so the heads cannot split the width evenly")
    if m.n_heads % m.n_kv_heads:
        _fail(where("model.n_heads", "model.n_kv_heads"),
              f"model.n_heads = {m.n_heads} is not divisible by model.n_kv_heads = {m.n_kv_heads}, "
              "so the query heads cannot share key/value heads in equal groups")
    if m.head_dim % 2:
        _fail(where("model.dim", "model.n_heads"),
              f"head_dim = model.dim / model.n_heads = {m.dim} / {m.n_heads} = {m.head_dim} is odd, "
              "but RoPE rotates the head in pairs (i, i + head_dim/2)")
    if m.dim % m.group_size:
        _fail(where("model.dim", "model.group_size"),
              f"model.dim = {m.dim} is not a multiple of model.group_size = {m.group_size}, "
              "but every ternary layer reading the residual needs its input width divisible by the group size")
    if m.ffn_hidden % m.group_size:
        _fail(where("model.ffn_hidden", "model.group_size"),
              f"model.ffn_hidden = {m.ffn_hidden} is not a multiple of model.group_size = {m.group_size}, "
              "but the FFN down projection reads ffn_hidden inputs in groups")
    _check_moe(m, where)
    _check_deltanet(m, where)

    o = cfg.optim
    if o.galore and o.galore_rank > o.galore_min_dim:
        _fail(where("optim.galore_rank", "optim.galore_min_dim"),
              f"optim.galore_rank = {o.galore_rank} exceeds optim.galore_min_dim = {o.galore_min_dim}, "
              "so some projected matrices would be smaller than the rank")

    t = cfg.train
    if t.collider_sparsity > 0 and int(t.collider_sparsity * m.seq_len) == 0:
        _fail(where("train.collider_sparsity", "model.seq_len"),
              f"train.collider_sparsity = {t.collider_sparsity} filters no token of a model.seq_len = {m.seq_len} "
              f"sequence (it filters floor(sparsity * seq_len) tokens)")


def _check_moe(m: ModelConfig, where) -> None:
    if m.n_experts == 0:
        return
    if m.moe_top_k > m.n_experts:
        _fail(where("model.moe_top_k", "model.n_experts"),
              f"model.moe_top_k = {m.moe_top_k} exceeds model.n_experts = {m.n_experts}, so a token cannot pick that many experts")
    if m.expert_hidden % m.group_size:
        _fail(where("model.moe_hidden", "model.ffn_hidden", "model.group_size"),
              f"the expert hidden size {m.expert_hidden} (model.moe_hidden, or model.ffn_hidden when it is 0) is not a "
              f"multiple of model.group_size = {m.group_size}, but each expert's down projection reads it in groups")
    if isinstance(m.moe_layers, tuple):
        _check_layer_list(m.moe_layers, "model.moe_layers", m.n_layers, where)
    if not m.moe_layer_ids:
        _fail(where("model.moe_layers", "model.n_layers"),
              f"model.moe_layers = {_toml_value(_plain(m.moe_layers))} selects no block of model.n_layers = {m.n_layers} "
              f"while model.n_experts = {m.n_experts}; set n_experts = 0 for a dense model")


def _check_deltanet(m: ModelConfig, where) -> None:
    if m.deltanet_layers and m.deltanet_ratio > 0:
        _fail(where("model.deltanet_layers", "model.deltanet_ratio"),
              f"model.deltanet_layers = {_toml_value(list(m.deltanet_layers))} and model.deltanet_ratio = "
              f"{m.deltanet_ratio} both choose DeltaNet blocks; set only one of them")
    if m.deltanet_layers:
        _check_layer_list(m.deltanet_layers, "model.deltanet_layers", m.n_layers, where)
    elif m.deltanet_ratio > 0 and _deltanet_count(m.deltanet_ratio, m.n_layers) == 0:
        _fail(where("model.deltanet_ratio", "model.n_layers"),
              f"model.deltanet_ratio = {m.deltanet_ratio} selects round({m.deltanet_ratio} * {m.n_layers}) = 0 "
              f"of the model.n_layers = {m.n_layers} blocks; raise the ratio or list deltanet_layers")
    if not m.deltanet_layer_ids:
        return
    width = m.dn_heads * m.dn_value_dim
    if width % m.group_size:
        _fail(where("model.deltanet_heads", "model.deltanet_value_dim", "model.group_size"),
              f"the DeltaNet output width deltanet_heads * value_dim = {m.dn_heads} * {m.dn_value_dim} = {width} "
              f"is not a multiple of model.group_size = {m.group_size}, but the ternary output projection reads it in groups")


def _check_layer_list(layers, name, n_layers, where) -> None:
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        _fail(where(name, "model.n_layers"),
              f"{name} = {_toml_value(list(layers))} has block index {bad[0]} outside 0..{n_layers - 1} "
              f"(model.n_layers = {n_layers})")
    dup = sorted({i for i in layers if layers.count(i) > 1})
    if dup:
        _fail(where(name), f"{name} = {_toml_value(list(layers))} lists block {dup[0]} more than once")


# --- small helpers ---------------------------------------------------------------------------


def _fail(source: str, problem: str):
    end = "" if problem.endswith(("?", ".")) else "."
    raise ConfigError(_one_line(f"{source}: {problem}{end}"))


def _one_line(text: str) -> str:
    """Control characters a user typed (a newline in a preset name, say) shown escaped: one line."""
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in text)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_float(value, name, source) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(source, f"{name} must be a number, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        _fail(source, f"{name} must be finite, got {_toml_value(value)}")
    return value


def _describe(value) -> str:
    if isinstance(value, bool):
        return f"the boolean {_toml_value(value)}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the float {_toml_value(value)}"
    if isinstance(value, str):
        return f"the string {_toml_value(value)}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


def _or_list(items) -> str:
    items = [f"'{i}'" if not str(i).startswith(("'", "[")) else str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_value(value) -> str:
    """One TOML value (the subset configs use: bool, int, float, string, flat list)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        out = []
        for ch in value:
            if ch in _TOML_ESCAPES:
                out.append(_TOML_ESCAPES[ch])
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


# --- parameter counts ------------------------------------------------------------------------


def count_parameters(model: ModelConfig | Config) -> dict[str, int]:
    """Parameters per component (``nanochat.model.params.COMPONENTS``) plus ``total``, from the
    parameter table (shapes only; nothing is allocated)."""
    from nanochat.model.params import count_parameters as from_table

    return from_table(model.model if isinstance(model, Config) else model)


def main(argv=None) -> int:
    """``python -m nanochat.config [PRESET|file.toml] [--set k=v ...]``: print the resolved config and counts."""
    import argparse

    parser = argparse.ArgumentParser(description="Show a resolved nanochat-ternary config and its parameter counts.")
    parser.add_argument("config", nargs="?", default=None, help="preset name or .toml file (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--list", action="store_true", help="list the shipped presets")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(available_presets()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(cfg.to_toml(), end="")
    counts = count_parameters(cfg.model)
    print("\n# parameters")
    for name, n in counts.items():
        if n:
            print(f"# {name:18s} {n:>15,d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
