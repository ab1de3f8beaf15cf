"""Optimizer-state bytes per rank with sharded state, for N ranks, per preset and optimizer variant.

Computed from the parameter table and the trainer's own optimizers and ownership rule
(``nanochat.train.distributed.state_bytes_per_rank``); no weights are allocated. The tiny
numbers agree with what the ranks of tests/test_distributed_mpi.py measure on their arrays.

    .venv/bin/python benchmarks/distributed/state_bytes.py > benchmarks/distributed/state_bytes.md
"""
from __future__ import annotations

from nanochat.config import load_config
from nanochat.train.distributed import state_bytes_per_rank

VARIANTS = {
    "Muon + AdamW": ["optim.muon_8bit=false", "optim.galore=false"],
    "8-bit Muon": ["optim.muon_8bit=true", "optim.galore=false"],
    "GaLore(Muon)": ["optim.galore=true"],
}


def main(presets=("tiny", "nano_125m", "small_560m", "medium_3b"), ranks=(1, 2, 3, 8, 64)):
    print("| preset | optimizer | " + " | ".join(f"N={n}: max per rank (ratio to N=1)" for n in ranks) + " |")
    print("|---|---|" + "---|" * len(ranks))
    for preset in presets:
        for label, sets in VARIANTS.items():
            cfg = load_config(preset, sets)
            one = sum(state_bytes_per_rank(cfg, 1))
            cells = []
            for n in ranks:
                per = state_bytes_per_rank(cfg, n)
                cells.append(f"{max(per) / 2**20:,.1f} MiB ({max(per) / one:.3f})")
            print(f"| {preset} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
