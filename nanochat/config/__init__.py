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

from nanochat.config.load import available_presets, load_config
from nanochat.config.schema import (
    Config, ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig, _toml_value, config_keys, count_parameters,
)
from nanochat.model.params import COMPONENTS as PARAMETER_COMPONENTS

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
    "_toml_value",
]
