"""``python -m nanochat.config [PRESET|file.toml] [--set k=v ...]``: a resolved config and its counts."""
from __future__ import annotations

from nanochat.cli.common import OneLineParser, fail
from nanochat.config import ConfigError, available_presets, count_parameters, load_config


def main(argv=None) -> int:
    """``python -m nanochat.config [PRESET|file.toml] [--set k=v ...]``: print the resolved config and counts."""
    parser = OneLineParser(prog="python -m nanochat.config", description="Show a resolved nanochat-ternary config and its parameter counts.")
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
        return fail(exc)
    print(cfg.to_toml(), end="")
    counts = count_parameters(cfg.model)
    print("\n# parameters")
    for name, n in counts.items():
        if n:
            print(f"# {name:18s} {n:>15,d}")
    return 0
