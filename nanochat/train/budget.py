"""The memory a training run needs, estimated from its config before anything is allocated.

``estimate_memory(cfg)`` returns bytes per part (``parameters``, ``gradients``, ``optimizer``,
``activations``, ``total``) from shapes alone (``config.count_parameters``), so that a config
that cannot fit is refused in one sentence before the model, the optimizer or the data exist.
``check_memory(cfg)`` compares the total with the memory of the machine (``memory_limit``) and
raises ``ConfigError`` naming the key whose halving shrinks the estimate most.

What is counted (``train.dtype`` bytes per value unless said otherwise):

- parameters: every parameter once (the float shadow weights);
- gradients: one array per parameter;
- optimizer: Muon's momentum for 2-D hidden weights (float32, or int8 plus one float32 scale per
  256 with ``optim.muon_8bit``), or GaLore's projected state (``rank / min(rows, cols)`` of it,
  plus the projector); AdamW's two moments or Lion's one for everything else;
- activations: what the autograd tape keeps for one micro-batch of ``batch_size x seq_len``
  tokens: per token and block about 24 ``dim``-wide values (norms, q/k/v/o, residuals, their
  quantized copies; times ``n_streams`` for the mHC streams), 6 per FFN hidden unit (gate, up,
  activation, product, quantized copies; ``moe_top_k`` experts' worth for MoE blocks), the
  attention probabilities ``2 x n_heads x seq_len`` per token; and the logits with their
  softmax and gradient (``3 x vocab_size`` per token, again per MTP head).

It is an estimate (docs/limits.md gives its measured error on the presets): its purpose is to
turn "the process was killed after filling the swap" into a sentence, not to plan to the byte.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from nanochat.config import Config, ConfigError, count_parameters

MEMORY_LIMIT_ENV = "NANOCHAT_MEMORY_LIMIT"  # bytes (or 512M, 8G, 1T): overrides the machine's memory
# Refuse above this share of the machine: the OS, the data and the loader need the rest.
MACHINE_SHARE = 0.9

_MUON_COMPONENTS = ("attn_q", "attn_k", "attn_v", "attn_o", "deltanet_qkv", "deltanet_gate", "deltanet_out",
                    "ffn", "moe_experts", "moe_shared_expert", "mtp")
# Keys that size memory, each tried at its default to find the one to name when a config does not fit.
_SIZE_KEYS = (("model", "vocab_size"), ("model", "dim"), ("model", "n_layers"), ("model", "ffn_hidden"),
              ("model", "n_experts"), ("model", "moe_hidden"), ("model", "seq_len"), ("model", "n_heads"),
              ("model", "mtp_n_tokens"), ("model", "n_streams"), ("train", "batch_size"))


def estimate_memory(cfg: Config) -> dict[str, int]:
    """Estimated bytes of a training run of ``cfg``: parameters, gradients, optimizer, activations, total."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    item = 8 if t.dtype == "float64" else 4
    counts = count_parameters(m)
    total_params = counts["total"]
    hidden = sum(counts[k] for k in _MUON_COMPONENTS)
    other = total_params - hidden
    if o.galore:
        smallest = max(1, min(m.dim, m.ffn_hidden))
        share = min(1.0, o.galore_rank / smallest)
        hidden_state = int(hidden * share) * 4 + int(hidden * share) * (2 if o.galore_projector_dtype == "float16" else 4)
    elif o.muon_8bit:
        hidden_state = hidden + 4 * -(-hidden // 256)
    else:
        hidden_state = 4 * hidden
    other_state = (1 if o.scalar_optimizer == "lion" else 2) * 4 * other
    tokens = t.batch_size * m.seq_len
    per_token_block = 24 * m.dim * m.n_streams + 2 * m.n_heads * m.seq_len
    per_token_ffn = 0
    for mixer, ffn in m.block_kinds():
        if ffn == "moe":
            per_token_ffn += 6 * m.expert_hidden * (m.moe_top_k + int(m.moe_shared_expert)) + m.n_experts
        else:
            per_token_ffn += 6 * m.ffn_hidden
    per_token = m.n_layers * per_token_block + per_token_ffn + 3 * m.vocab_size * (1 + m.mtp_n_tokens)
    out = {
        "parameters": item * total_params,
        "gradients": item * total_params,
        "optimizer": hidden_state + other_state,
        "activations": item * tokens * per_token,
    }
    out["total"] = sum(out.values())
    out["parameter_count"] = total_params
    return out


def _parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    scale = 1
    for suffix, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if text.endswith(suffix):
            text, scale = text[:-1], factor
            break
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"${MEMORY_LIMIT_ENV} = {text!r} is not a size (bytes, or a number with K, M, G or T)") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError(f"${MEMORY_LIMIT_ENV} must be a positive size")
    return int(value * scale)


def machine_memory(backend: str = "auto") -> tuple[int, str]:
    """``(bytes, what)``: the memory a run may use here, and a few words saying what that is."""
    env = os.environ.get(MEMORY_LIMIT_ENV)
    if env:
        return _parse_size(env), f"${MEMORY_LIMIT_ENV}"
    if backend == "cupy":
        try:  # pragma: no cover - needs a GPU
            import cupy

            free, total = cupy.cuda.runtime.memGetInfo()
            return int(total * MACHINE_SHARE), "of the GPU's memory"
        except Exception:
            pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 62, "unknown"
    return int(total * MACHINE_SHARE), "of this machine's memory"


def format_bytes(n: int) -> str:
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def describe(estimate: Mapping[str, int]) -> str:
    """``"1.2 GiB (parameters 100 MiB, gradients ..., optimizer ..., activations ...)"``."""
    parts = ", ".join(f"{k} {format_bytes(estimate[k])}" for k in ("parameters", "gradients", "optimizer", "activations"))
    return f"{format_bytes(estimate['total'])} ({parts})"


def _biggest_key(cfg: Config, total: int) -> tuple[str, object]:
    """The size key that costs the most memory: the one whose reset to its default saves the most."""
    best, best_saving = ("model", "dim"), None
    for section, key in _SIZE_KEYS:
        sec = getattr(cfg, section)
        default = getattr(type(sec)(), key)
        if getattr(sec, key) == default:
            continue
        try:
            smaller = dataclasses.replace(cfg, **{section: dataclasses.replace(sec, **{key: default})})
            saving = total - estimate_memory(smaller)["total"]
        except (ValueError, ZeroDivisionError, KeyError):
            continue
        if best_saving is None or saving > best_saving:
            best, best_saving = (section, key), saving
    return f"{best[0]}.{best[1]}", getattr(getattr(cfg, best[0]), best[1])


def check_memory(cfg: Config, backend: str | None = None) -> dict[str, int]:
    """``estimate_memory(cfg)``, or ConfigError (one sentence naming a key) when it exceeds the machine."""
    estimate = estimate_memory(cfg)
    limit, what = machine_memory(backend or cfg.train.backend)
    estimate["limit"] = limit
    if estimate["total"] > limit:
        key, value = _biggest_key(cfg, estimate["total"])
        raise ConfigError(
            f"{key} = {value}: this config needs an estimated {describe(estimate)} of memory to train, more than "
            f"the {format_bytes(limit)} {what if what.startswith('of') else 'allowed by ' + what}; lower {key} "
            f"(the estimate is explained in docs/limits.md)"
        )
    return estimate


# Calibration of the step-time estimate: the tiny preset trains at 2,412 tokens/s with the numba
# backend on the 2-core AMD EPYC development machine (README, measured 2026-11-27); other CPUs
# scale with their cores and clock, so the estimate is an order of magnitude, said as such.
_CALIBRATION_PRESET_TOKENS_PER_SEC = 2412.0
FAR_BEYOND_SECONDS = 600.0  # a step estimated longer than this gets a warning at start


def flops_per_token(m) -> float:
    """Multiply-adds x 2 of one training token (forward + backward = 3 x forward): every matrix a
    token passes through (the top-k experts of an MoE block, the LM head once per MTP head too)
    plus causal attention over the sequence."""
    counts = count_parameters(m)
    matrix = counts["total"] - counts["embedding"] - counts["norms"] - counts["mhc"]
    if m.n_experts:
        active = (m.moe_top_k / m.n_experts) * counts["moe_experts"]
        matrix += active - counts["moe_experts"]
    head = m.vocab_size * m.dim * (1 + m.mtp_n_tokens)
    attention_layers = sum(1 for mixer, _ in m.block_kinds() if mixer == "attention")
    attention = 2 * attention_layers * m.seq_len * m.n_heads * m.head_dim  # QK^T and PV, causal half
    return 6.0 * (matrix + head + attention)


def estimate_step_seconds(cfg: Config) -> float:
    """Rough seconds per training step on a CPU like the calibration machine (see above)."""
    from nanochat.config import load_config

    ref = load_config("tiny").model
    rate = _CALIBRATION_PRESET_TOKENS_PER_SEC * flops_per_token(ref)  # effective FLOP/s
    tokens = cfg.train.batch_size * cfg.model.seq_len * cfg.train.grad_accum
    return tokens * flops_per_token(cfg.model) / rate


def describe_time(cfg: Config) -> str:
    """The start-up line on step time, with a warning when the config is far beyond a CPU."""
    seconds = estimate_step_seconds(cfg)
    text = (f"about {seconds:,.1f} s per step on a 2-core CPU like the one the estimate is calibrated on "
            f"(numba, tiny preset at 2,412 tokens/s); a GPU or more cores are faster")
    if seconds > FAR_BEYOND_SECONDS:
        text += (f"; warning: at {seconds / 3600:,.1f} h per step this config is far beyond a CPU, lower "
                 f"train.batch_size or model.seq_len, pick a smaller preset, or use --backend cupy")
    return text
