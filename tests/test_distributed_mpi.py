"""Data parallelism with real MPI processes on this machine's loopback (``mpiexec -n 2`` and ``-n 3``).

Every run goes through ``tests/distributed_worker.py`` (or the CLI) in its own process group with
a hard timeout: a hung collective fails the test instead of hanging CI. The model is the trainer
tests' tiny one on synthetic tokens.

Equivalence is checked with float64 parameters: with float32 the gradient sums of 2 ranks and of
one process differ in the last bits (summation order), and the ternary quantizer turns such a
difference into a flipped trit once a shadow weight sits at a rounding boundary, after which the
runs drift apart (measured: <= 1e-7 relative for the first ~7 steps, then up to 1.5e-3 over 20 steps,
at full and at one tenth of the rates alike). In float64 they agree to ~1e-16 (docs/distributed.md).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed_worker.py"


def _mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
pytestmark = [
    pytest.mark.trainer,
    pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                       reason="needs mpi4py and an mpiexec (pip install -e '.[mpi]')"),
]

TINY = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2", "model.group_size=64",
    "model.ffn_hidden=128", "model.seq_len=32", "model.vocab_size=300", "train.steps=20",
    "train.eval_every=0", "train.eval_batches=2", "train.log_every=1", "train.backend=numpy",
    "train.sample_tokens=0", "train.tensorboard=false", "train.keep_last_k=10", "optim.warmup_steps=2",
]
TENTH_RATES = ["optim.muon_lr=0.002", "optim.adamw_lr=0.0003", "optim.embedding_lr=0.001", "optim.head_lr=0.0004"]
F64 = ["train.dtype=float64"]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_", "OMPI_", "HYDRA_"))}
    env.update(NANOCHAT_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _run(cmd, timeout, cwd=ROOT):
    """Run ``cmd`` in its own process group; kill the whole group at the timeout."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish in {timeout} s\nstdout:\n{out[-2000:]}\nstderr:\n{err[-2000:]}")
    return proc.returncode, out, err


def run_ranks(n, tmp_path, name, timeout=240, **spec):
    """Run the worker on ``n`` ranks (plain python for 1); returns rank 0's JSON and weights."""
    spec.setdefault("out_dir", str(tmp_path / name))
    spec["out"] = str(tmp_path / f"{name}.json")
    path = tmp_path / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(WORKER), str(path)]
    if n > 1:
        cmd = [MPIEXEC, "-n", str(n)] + cmd
    rc, out, err = _run(cmd, timeout)
    assert rc == 0, f"{n} ranks exited with {rc}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    result = json.loads(Path(spec["out"]).read_text())
    with np.load(spec["out"] + ".npz") as z:
        result["weights"] = {k: z[k] for k in z.files}
    return result


def assert_replicas_identical(result):
    for i, step in enumerate(result["steps"]):
        assert len(set(step["hashes"])) == 1, f"step {i}: replicas differ ({step['hashes']})"


def max_rel(a, b, key="loss"):
    return max(abs(x[key] - y[key]) / abs(x[key]) for x, y in zip(a["steps"], b["steps"]))


def test_two_ranks_match_one_rank_over_20_steps(tmp_path):
    """2 ranks x batch 2 == 1 rank x batch 4: losses within 1e-5 relative over 20 steps at one
    tenth of the rates, gradient norms too, and the replicas are bitwise identical every step."""
    base = TINY + TENTH_RATES + F64
    one = run_ranks(1, tmp_path, "one", overrides=base + ["train.batch_size=4"], steps=20)
    two = run_ranks(2, tmp_path, "two", overrides=base + ["train.batch_size=2"], steps=20)
    assert len(two["steps"]) == 20
    assert_replicas_identical(two)
    assert max_rel(one, two, "loss") <= 1e-5
    assert max_rel(one, two, "ce") <= 1e-5
    assert max_rel(one, two, "grad_norm") <= 1e-5
    # Sharded optimizer state: each rank holds part of it, together all of it (a row-split
    # tensor's 8-byte step counter is kept by each rank holding rows of it).
    total = one["state_bytes"][0]
    assert total <= sum(two["state_bytes"]) <= total + 8 * 2 * 4
    assert max(two["state_bytes"]) <= 0.51 * total


def test_three_ranks_uneven_shards(tmp_path):
    """3 ranks x batch 2 == 1 rank x batch 6 (3 does not divide the parameter list evenly)."""
    base = TINY + F64
    one = run_ranks(1, tmp_path, "one", overrides=base + ["train.batch_size=6"], steps=5)
    three = run_ranks(3, tmp_path, "three", overrides=base + ["train.batch_size=2"], steps=5)
    assert_replicas_identical(three)
    assert len(three["steps"][0]["hashes"]) == 3
    assert max_rel(one, three, "loss") <= 1e-5
    total = one["state_bytes"][0]
    assert total <= sum(three["state_bytes"]) <= total + 8 * 3 * 4
    assert max(three["state_bytes"]) <= 0.4 * total


def test_resume_bit_exact_same_world_and_across_world_sizes(tmp_path):
    """2 ranks: 6 steps in one go == 3 steps + checkpoint + 3 steps (bitwise); and the chain
    2 ranks -> checkpoint -> 1 rank (batch 2x) -> checkpoint -> 2 ranks trains the same model
    (float64: agrees to rounding with the straight run)."""
    base = TINY + F64
    straight = run_ranks(2, tmp_path, "straight", overrides=base + ["train.batch_size=2"], steps=6)
    first = run_ranks(2, tmp_path, "first", overrides=base + ["train.batch_size=2"], steps=3, save=True)
    assert_replicas_identical(first)
    ck = str(tmp_path / "first" / "checkpoints" / "step-000003")
    assert (Path(ck) / "optimizer.safetensors").exists()
    again = run_ranks(2, tmp_path, "again", overrides=base + ["train.batch_size=2"], steps=3, resume=ck)
    assert_replicas_identical(again)
    for name, w in straight["weights"].items():
        assert np.array_equal(w, again["weights"][name]), f"{name}: resume at the same world size is not bit-exact"
    # 2 -> 1 -> 2: the 1-rank run restores the gathered state in full, the 2-rank run shards it again.
    single = run_ranks(1, tmp_path, "single", overrides=base + ["train.batch_size=4"], steps=2, resume=ck, save=True)
    assert single["final_step"] == 5
    ck2 = str(tmp_path / "single" / "checkpoints" / "step-000005")
    back = run_ranks(2, tmp_path, "back", overrides=base + ["train.batch_size=2"], steps=1, resume=ck2)
    assert back["final_step"] == 6
    assert_replicas_identical(back)
    for name, w in straight["weights"].items():
        np.testing.assert_allclose(back["weights"][name], w, rtol=1e-9, atol=1e-12, err_msg=name)


def _run_failing(tmp_path, name, **failure):
    """Two ranks where rank 1 fails at step 2 as ``failure`` says; every rank must stop, well
    within the 90 s limit. Returns the output."""
    spec = dict(overrides=TINY + ["train.batch_size=2"], steps=10, fail_rank=1, fail_step=2,
                out_dir=str(tmp_path / name), **failure)
    path = tmp_path / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    started = time.monotonic()
    rc, out, err = _run([MPIEXEC, "-n", "2", sys.executable, str(WORKER), str(path)], timeout=90)
    assert rc != 0
    assert time.monotonic() - started < 90
    return out, err


def test_a_failing_rank_stops_every_rank_with_one_error_line(tmp_path):
    out, err = _run_failing(tmp_path, "fail")
    lines = [line for line in (out + err).splitlines() if line.startswith("error:")]
    assert lines == ["error: rank 1 of 2: injected failure at step 2"], err[-2000:]


def test_a_killed_rank_stops_every_rank(tmp_path):
    _run_failing(tmp_path, "killed", fail_kill=True)


def _token_file(tmp_path):
    rng = np.random.default_rng(0)
    tokens = np.tile(np.arange(0, 300, 7), 500)
    noise = rng.random(tokens.size) < 0.1
    tokens[noise] = rng.integers(0, 300, int(noise.sum()))
    path = tmp_path / "tokens.bin"
    tokens.astype("<u2").tofile(path)
    return path


def _cli(tmp_path, steps, out, *extra):
    sets = [a for s in TINY + ["train.batch_size=2", "train.eval_every=2"] for a in ("--set", s)]
    return [sys.executable, "-m", "nanochat.train", "--nproc", "2", "--data", str(_token_file(tmp_path)),
            "--steps", str(steps), "--out", str(out), "--quiet", *sets, *extra]


def test_cli_nproc_logs_and_checkpoints_from_rank_zero(tmp_path):
    out = tmp_path / "run"
    rc, stdout, stderr = _run(_cli(tmp_path, 4, out), timeout=180)
    assert rc == 0, stderr[-3000:]
    assert stdout.count("data parallel: 2 ranks") == 1
    assert stdout.count("checkpoint:") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # one writer: every step logged once
    assert all(r["time_comm"] >= 0 for r in train)
    assert train[-1]["tokens"] == 4 * 2 * 2 * 32  # global tokens: steps x ranks x batch x seq_len
    assert [r["step"] for r in records if r["kind"] == "val"] == [0, 2, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004"]


def test_ctrl_c_saves_once_and_stops_every_rank(tmp_path):
    out = tmp_path / "run"
    cmd = _cli(tmp_path, 100000, out, "--set", "train.eval_every=0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while time.monotonic() < deadline:
            if metrics.exists() and '"kind": "train"' in metrics.read_text():
                break
            if proc.poll() is not None:
                pytest.fail(f"run ended early: {proc.communicate()[1][-2000:]}")
            time.sleep(0.2)
        else:
            pytest.fail("no training step within 120 s")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("ranks did not stop within 60 s of Ctrl-C")
    assert proc.returncode == 130, err[-3000:]
    ckpts = list((out / "checkpoints").iterdir())
    assert len(ckpts) == 1
    state = json.loads((ckpts[0] / "state.json").read_text())
    assert state["step"] >= 1


FEATURES = ["model.n_layers=3", "model.n_streams=2", "model.mtp_n_tokens=2", "train.collider_sparsity=0.35",
            "model.deltanet_ratio=0.34"]


def test_features_match_one_process(tmp_path):
    """mHC streams, multi-token prediction, Collider and a DeltaNet block: 2 ranks == 1 rank."""
    base = TINY + F64 + FEATURES
    one = run_ranks(1, tmp_path, "one", overrides=base + ["train.batch_size=4"], steps=4)
    two = run_ranks(2, tmp_path, "two", overrides=base + ["train.batch_size=2"], steps=4)
    assert_replicas_identical(two)
    assert max_rel(one, two, "loss") <= 1e-10


def test_grad_accumulation_matches_one_process(tmp_path):
    """grad_accum = 2: the reduction starts during the last micro-batch's backward."""
    base = TINY + F64 + ["train.grad_accum=2"]
    one = run_ranks(1, tmp_path, "one", overrides=base + ["train.batch_size=4"], steps=3)
    two = run_ranks(2, tmp_path, "two", overrides=base + ["train.batch_size=2"], steps=3)
    assert_replicas_identical(two)
    assert max_rel(one, two, "loss") <= 1e-10


def test_moe_matches_one_process(tmp_path):
    """MoE: the load-balancing loss takes the expert fractions of the global batch (counts summed
    over ranks), so 2 ranks == 1 rank here too, and the expert loads logged are global."""
    base = TINY + F64 + ["model.n_experts=4", "model.moe_top_k=2"]
    one = run_ranks(1, tmp_path, "one", overrides=base + ["train.batch_size=4"], steps=4)
    two = run_ranks(2, tmp_path, "two", overrides=base + ["train.batch_size=2"], steps=4)
    assert_replicas_identical(two)
    assert max_rel(one, two, "loss") <= 1e-10
