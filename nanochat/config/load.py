"""Loading a config: presets and files (with ``base`` inheritance), ``--set`` overrides, and
validation of every value and of the keys against each other."""
from __future__ import annotations

import difflib
import sys
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from dataclasses import fields

from nanochat.config.schema import (
    DEFAULT_PRESET, DEFAULT_SOURCE, LAYER_PATTERNS, MAX_BASE_DEPTH, MAX_CONFIG_BYTES, PRESET_DIR, PRESET_PACKAGE, _KEYS,
    _SECTIONS, Config, ModelConfig, _as_float, _deltanet_count, _describe, _fail, _is_int, _num, _or_list, _plain,
    _Spec, _toml_value,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


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
