"""One rank of a data-parallel test run (started by tests/test_distributed_mpi.py under mpiexec).

``python tests/distributed_worker.py SPEC.json``; the spec says what to do:

- ``steps``: optimizer steps to take, one ``train_step`` at a time; rank 0 writes ``out`` (JSON)
  with every step's loss numbers, gradient norm and each rank's SHA-256 of all weights;
- ``overrides``: config ``--set`` strings (the tests' tiny model, numpy backend);
- ``resume``: a checkpoint directory to start from; ``save``: write a checkpoint at the end
  (``out_dir``); ``until``: run ``Trainer.train(until)`` instead of single steps;
- ``fail_rank``/``fail_step``: that rank raises at that step, or with ``fail_kill`` is killed by
  SIGKILL (the others must not hang).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanochat.config import load_config  # noqa: E402
from nanochat.io.checkpoint import load_checkpoint  # noqa: E402

from nanochat.train import ranks  # noqa: E402
from nanochat.train.trainer import Trainer  # noqa: E402

from run_helpers import synthetic_data  # noqa: E402  (tests/ is this script's directory)


def main(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    comm = ranks.communicator()
    ranks.install_excepthook(comm)
    cfg = load_config("tiny", spec["overrides"])
    ck = load_checkpoint(spec["resume"]) if spec.get("resume") else None
    trainer = Trainer(cfg, out_dir=spec["out_dir"], resume=ck, progress=False, data=synthetic_data(20000, 1200), comm=comm)
    steps = []
    if spec.get("until"):
        trainer.train(until=spec["until"])
    else:
        loader = trainer._make_loader()
        for s in range(spec.get("steps", 0)):
            if comm.rank == spec.get("fail_rank", -1) and s == spec.get("fail_step", -1):
                if spec.get("fail_kill"):
                    os.kill(os.getpid(), signal.SIGKILL)  # dies without a word
                raise RuntimeError(f"injected failure at step {s}")
            rec = trainer.train_step(loader)
            times = rec.pop("times")
            digest = trainer.dist.weights_hash() if trainer.dist is not None else _hash(trainer)
            hashes = comm.comm.allgather(digest) if comm.size > 1 else [digest]
            steps.append({"loss": rec["loss"], "ce": rec["ce"], "grad_norm": rec["grad_norm"], "hashes": hashes,
                          "time_step": times.total, "time_comm": times.comm})
        if hasattr(loader, "close"):
            loader.close()
        if spec.get("save"):
            trainer.save()
    state_bytes = trainer.dist.state_nbytes() if trainer.dist is not None else \
        sum(opt.state_nbytes() for _, opt, _ in trainer.optimizers)
    all_bytes = comm.comm.allgather(state_bytes) if comm.size > 1 else [state_bytes]
    if comm.is_main and spec.get("out"):
        weights = {name: trainer.be.to_numpy(p.data) for name, p in trainer.model.params.items()}
        np.savez(spec["out"] + ".npz", **weights)
        Path(spec["out"]).write_text(json.dumps({"steps": steps, "state_bytes": all_bytes,
                                                 "final_step": trainer.state.step,
                                                 "history": trainer.state.history}))


def _hash(trainer):
    import hashlib

    h = hashlib.sha256()
    for p in trainer.model.params.values():
        h.update(np.ascontiguousarray(trainer.be.to_numpy(p.data)).tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    main(sys.argv[1])
