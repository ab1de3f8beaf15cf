"""One-rank check of the NCCL data-parallel path on a GPU (run by scripts/gpu_check.sh).

Builds ``backends.cupy_backend.nccl.NCCLCommunicator`` (bootstrapped over MPI when mpi4py is
installed, else over the one-process communicator: one rank needs nobody to share the unique
id with), checks reduce/bcast/allreduce on device buffers, then trains a tiny model for a few
steps through ``DataParallel`` on that communicator and compares with the plain trainer.
Prints one JSON line; exit code 0 when every check passes.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    import cupy

    from backends.cupy_backend.nccl import NCCLCommunicator, nccl_status
    from nanochat.config import load_config
    from nanochat.train import distributed, ranks
    from nanochat.train.trainer import Trainer

    ok, detail = nccl_status()
    report = {"nccl": detail if ok else None}
    if not ok:
        print(json.dumps({**report, "error": detail}))
        return 1
    try:
        boot = ranks.MPICommunicator()
        report["bootstrap"] = "mpi"
    except ImportError:
        boot = ranks.SingleProcess()
        report["bootstrap"] = "single"
    comm = NCCLCommunicator(boot)
    x = cupy.arange(1 << 20, dtype=cupy.float32)
    want = x.copy()
    comm.reduce(x, 0)
    comm.bcast(x, 0)
    comm.allreduce(x)
    comm.wait_all([])
    report["collectives_ok"] = bool((x == want).all())

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, 20000).astype(np.uint16)
    data = SimpleNamespace(train_tokens=tokens[:18000], val_tokens=tokens[18000:], vocab_size=300,
                           tokenizer=None, tokenizer_path=None)
    sets = ["model.dim=128", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2", "model.group_size=64",
            "model.ffn_hidden=256", "model.seq_len=64", "model.vocab_size=300", "train.batch_size=4",
            "train.steps=5", "train.eval_every=0", "train.backend=cupy", "train.sample_tokens=0",
            "train.tensorboard=false"]
    losses = {}
    for mode in ("plain", "nccl"):
        cfg = load_config("tiny", sets)
        tr = Trainer(cfg, out_dir=f"/tmp/nccl_check_{mode}", progress=False, data=data)
        if mode == "nccl":  # one rank through the data-parallel step on the NCCL communicator
            tr.comm = comm
            tr.dist = distributed.DataParallel(tr.model, tr.optimizers, comm)
            tr.dist.shard_state()
        loader = tr._make_loader()
        t0 = time.perf_counter()
        losses[mode] = [tr.train_step(loader)["loss"] for _ in range(5)]
        report[f"seconds_{mode}"] = time.perf_counter() - t0
    diff = max(abs(a - b) / abs(a) for a, b in zip(losses["plain"], losses["nccl"]))
    report.update(losses=losses, max_rel_diff=diff, train_ok=diff <= 1e-4)
    print(json.dumps(report))
    return 0 if report["collectives_ok"] and report["train_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
