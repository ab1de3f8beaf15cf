"""Data parallelism without MPI: ownership, per-rank batch slices, launcher arguments, the NCCL
module's import path. The multi-process runs are in tests/test_distributed_mpi.py."""
from __future__ import annotations

import ast
import py_compile
from pathlib import Path

import numpy as np
import pytest

from nanochat.data.loader import AsyncLoader, BatchLoader
from nanochat.train import distributed
from nanochat.train import ranks

ROOT = Path(__file__).resolve().parent.parent


def test_owners_are_deterministic_and_balanced():
    items = [(f"p{i}", c) for i, c in enumerate([100, 90, 80, 10, 10, 10, 5, 1])]
    a = distributed.assign_owners(items, 3)
    assert a == distributed.assign_owners(list(items), 3)
    loads = [sum(c for k, c in items if a[k] == r) for r in range(3)]
    assert max(loads) - min(loads) <= 100 - 80 + 5
    assert distributed.assign_owners(items, 1) == {k: 0 for k, _ in items}
    # More ranks than items: the extra ranks own nothing.
    two = distributed.assign_owners(items[:2], 4)
    assert sorted(two.values()) == [0, 1]


@pytest.mark.parametrize("world", [2, 3])
def test_rank_slices_make_up_the_single_process_batch(world):
    tokens = np.arange(5000, dtype=np.uint16)
    whole = BatchLoader(tokens, 2 * world, 16, seed=7)
    for step in (0, 1, 9):
        parts = [BatchLoader(tokens, 2, 16, seed=7, shard=(r, world)).batch_at(step) for r in range(world)]
        assert np.array_equal(np.concatenate(parts), whole.batch_at(step))
    with AsyncLoader(tokens, 2, 16, seed=7, start_step=3, workers=1, shard=(1, world)) as loader:
        assert np.array_equal(next(loader), whole.batch_at(3)[2:4])


def test_shard_is_checked():
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(ValueError, match="rank must lie"):
        BatchLoader(tokens, 2, 8, seed=0, shard=(2, 2))


def test_strip_nproc():
    assert ranks.strip_nproc(["--steps", "3"]) == (None, ["--steps", "3"])
    assert ranks.strip_nproc(["--nproc", "2", "--steps", "3"]) == (2, ["--steps", "3"])
    assert ranks.strip_nproc(["--nproc=4"]) == (4, [])
    with pytest.raises(ValueError, match="whole number"):
        ranks.strip_nproc(["--nproc", "two"])
    with pytest.raises(ValueError, match=r"\[1, 1024\]"):
        ranks.strip_nproc(["--nproc", "0"])


def test_launcher_detection():
    assert not ranks.launched_by_mpi({})
    assert ranks.launched_by_mpi({"PMI_SIZE": "2", "PMI_RANK": "0"})
    assert ranks.launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "4"})
    assert not ranks.launched_by_mpi({"PMI_SIZE": "1"})  # one rank: no MPI needed at all
    assert not ranks.launched_by_mpi({"PMI_SIZE": "2", "NANOCHAT_NO_MPI": "1"})
    assert isinstance(ranks.communicator(), ranks.SingleProcess)


def test_nothing_above_backends_imports_cupy_or_mpi_at_module_level():
    """SPEC 1: cupy only below backends/; mpi4py only inside MPICommunicator (lazy)."""
    tree = ast.parse((ROOT / "nanochat" / "train" / "distributed.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top for a in n.names} | {n.module for n in top if isinstance(n, ast.ImportFrom)}
    assert not any(str(x).startswith(("cupy", "mpi4py")) for x in names)
    assert "import cupy" not in (ROOT / "nanochat" / "train" / "distributed.py").read_text()


def test_nccl_module_compiles_and_imports_without_a_gpu():
    path = ROOT / "backends" / "cupy_backend" / "nccl.py"
    py_compile.compile(str(path), doraise=True)
    from backends.cupy_backend import nccl

    ok, detail = nccl.nccl_status()
    assert isinstance(ok, bool) and detail
    if not ok:
        class FakeMPI:
            size, rank, local_rank = 2, 0, 0

        with pytest.raises(RuntimeError, match="needs NCCL"):
            nccl.NCCLCommunicator(FakeMPI())


def test_single_process_communicator_is_the_identity():
    c = ranks.SingleProcess()
    assert (c.rank, c.size, c.is_main) == (0, 1, True)
    assert c.allgather_values([1.5, 2]).tolist() == [[1.5, 2.0]]
    assert c.gather_arrays({"a": np.ones(2)})["a"].tolist() == [1.0, 1.0]
    assert ranks.agree_on_failure(c, None) == (None, False)
    assert ranks.agree_on_failure(c, ValueError("bad key")) == ("error: bad key", True)


def test_load_balance_loss_with_global_counts_averages_to_the_global_loss():
    """The identity behind data-parallel MoE: with the expert counts of the whole batch, the mean
    over ranks of each rank's load-balancing loss (and gradient) is the whole batch's."""
    from reference.autograd import Tensor
    from reference.moe import load_balance_loss, topk_route

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((8, 4))
    _, indices = topk_route(logits, 2)
    whole = Tensor(logits.copy(), requires_grad=True)
    ref = load_balance_loss(whole, indices, 4)
    ref.backward()
    counts = np.bincount(np.asarray(indices).reshape(-1), minlength=4)
    same = load_balance_loss(logits, indices, 4, counts=counts)
    assert same.item() == pytest.approx(ref.item(), rel=1e-15)
    total, grads = 0.0, []
    for part in (slice(0, 4), slice(4, 8)):
        t = Tensor(logits[part].copy(), requires_grad=True)
        loss = load_balance_loss(t, indices[part], 4, counts=counts)
        (loss * 0.5).backward()
        total += 0.5 * loss.item()
        grads.append(t.grad)
    assert total == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(np.concatenate(grads), whole.grad, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="counts must have shape"):
        load_balance_loss(logits, indices, 4, counts=np.ones(3))


def test_nproc_without_mpi_is_one_error_line(monkeypatch, capsys):
    from nanochat.cli import train as train_cli

    def missing():
        raise RuntimeError("--nproc needs an MPI launcher: pip install -e '.[mpi]' (mpi4py and the mpich wheel)")

    monkeypatch.setattr(ranks, "mpiexec_path", missing)
    monkeypatch.delenv("PMI_SIZE", raising=False)
    assert train_cli.main(["--nproc", "2", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --nproc needs an MPI launcher: pip install -e '.[mpi]' (mpi4py and the mpich wheel)"]


def test_backward_reports_each_leaf_once_its_gradient_is_final():
    from reference.autograd import Tensor

    rng = np.random.default_rng(0)
    a = Tensor(rng.standard_normal((3, 4)), requires_grad=True)
    b = Tensor(rng.standard_normal((4, 2)), requires_grad=True)
    c = Tensor(rng.standard_normal((3, 2)), requires_grad=True)
    unused = Tensor(np.ones(2), requires_grad=True)
    seen = []

    def ready(leaf):
        seen.append((leaf, None if leaf.grad is None else leaf.grad.copy()))

    loss = (((a @ b) * c).sum() + (a * a).sum())
    loss.backward(on_leaf_ready=ready)
    assert sorted(id(t) for t, _ in seen) == sorted([id(a), id(b), id(c)])  # once each, not `unused`
    for leaf, grad_then in seen:
        np.testing.assert_array_equal(grad_then, leaf.grad)  # nothing was added afterwards
    assert unused.grad is None
