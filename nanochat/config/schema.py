"""The config schema: the four typed sections, their keys, bounds and meanings, and ``Config``.

Loading and validation live in ``nanochat.config.load``; ``nanochat.config`` re-exports the API.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

import backends



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
        from nanochat.config.load import _build, _flatten

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
        from nanochat.config.load import _apply_overrides, _build, _flatten

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
