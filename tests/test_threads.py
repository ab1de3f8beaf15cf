"""backends.threads: the thread-pool policy, NANOCHAT_THREADS and numba's cache directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backends import threads

ROOT = Path(__file__).resolve().parents[1]


def test_requested_threads(monkeypatch):
    monkeypatch.delenv(threads.ENV_THREADS, raising=False)
    assert threads.requested_threads() is None
    monkeypatch.setenv(threads.ENV_THREADS, "auto")
    assert threads.requested_threads() is None
    monkeypatch.setenv(threads.ENV_THREADS, "3")
    assert threads.requested_threads() == 3
    for bad in ("-1", "two"):
        monkeypatch.setenv(threads.ENV_THREADS, bad)
        with pytest.raises(ValueError, match=threads.ENV_THREADS):
            threads.requested_threads()


def test_fixed_policy_is_capped_at_the_cores(monkeypatch):
    monkeypatch.setenv(threads.ENV_THREADS, "1000")
    pol = threads.ThreadPolicy()
    assert not pol.adaptive
    assert pol.threads == pol.cores == threads.available_cores()
    assert pol.adapt() == pol.threads


def test_choose_leaves_the_busy_cores(monkeypatch):
    monkeypatch.delenv(threads.ENV_THREADS, raising=False)
    pol = threads.ThreadPolicy()
    pol.cores = pol.max_threads = 2
    assert pol.choose(0.0) == 2
    assert pol.choose(0.3) == 2
    assert pol.choose(1.0) == 1
    assert pol.choose(5.0) == 1  # never below one thread


def test_apply_sets_numba_and_blas_pools():
    """numba gets the policy's count, BLAS one thread (the numba backend splits products itself)."""
    import numba
    import threadpoolctl

    before = numba.get_num_threads()
    blas_before = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    try:
        n = min(2, threads.available_cores(), numba.config.NUMBA_NUM_THREADS)
        pol = threads.ThreadPolicy(threads=n)
        pol.apply()
        assert numba.get_num_threads() == n
        assert all(i["num_threads"] == threads.blas_threads(n) for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas")
    finally:
        numba.set_num_threads(before)
        if blas_before:
            threadpoolctl.threadpool_limits(limits=max(blas_before), user_api="blas")


def test_cache_dir_follows_nanochat_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv(threads.ENV_CACHE, str(tmp_path))
    assert threads.numba_cache_dir() == tmp_path / "numba"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert threads.numba_cache_dir() == tmp_path / "elsewhere"


def test_compile_notice(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    said = []
    assert threads.compile_notice("numba", said.append)
    assert said and said[0].startswith(threads.COMPILE_NOTICE)
    assert not threads.compile_notice("numpy", said.append)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "linear._fold_group-1.py311.nbi").write_bytes(b"")
    assert threads.kernels_cached()
    assert not threads.compile_notice("numba", said.append)


def test_numba_backend_caches_outside_the_source_tree(tmp_path):
    """A fresh process importing the numba backend points numba's cache at the user cache."""
    env = dict(os.environ, NANOCHAT_CACHE=str(tmp_path))
    env.pop("NUMBA_CACHE_DIR", None)
    code = ("import backends, numba; backends.get_backend('numba'); "
            "print(numba.config.CACHE_DIR)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "numba")


def test_start_training_applies_the_policy(monkeypatch, tmp_path):
    monkeypatch.setenv(threads.ENV_THREADS, "1")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    import numba

    before = numba.get_num_threads()
    said = []
    try:
        described = threads.start_training("numba", said.append)
        assert described["threads"] == 1 and described["mode"] == "fixed"
        assert said and threads.COMPILE_NOTICE in said[0]
        assert threads.adapt_threads() == 1
    finally:
        numba.set_num_threads(before)
        monkeypatch.delenv(threads.ENV_THREADS)
        threads.apply_thread_policy(threads.available_cores())


def test_inference_forwards_leave_a_busy_core(monkeypatch):
    """inference_threads (before every engine forward) resizes numba's pool to the free cores."""
    import numba

    class Busy:
        def others(self):
            return 1.0  # another process holds a core

    monkeypatch.delenv(threads.ENV_THREADS, raising=False)
    before = numba.get_num_threads()
    try:
        threads.apply_thread_policy()
        pol = threads.policy()
        pol.adaptive, pol.fixed, pol._meter = True, None, Busy()
        threads.inference_threads()
        assert numba.get_num_threads() == 1 and pol.threads == 1
    finally:
        numba.set_num_threads(before)
        threads.apply_thread_policy(threads.available_cores())


def _spin_probe(env_extra, start_pool_first=False):
    """Run inference_spin in a fresh process; return (its answer, GOMP_SPINCOUNT, spinning_workers)."""
    env = dict(os.environ, **env_extra)
    if "GOMP_SPINCOUNT" not in env_extra:
        env.pop("GOMP_SPINCOUNT", None)
    code = ("import os, numba, numpy as np\n"
            "from backends import threads\n"
            + ("numba.njit(parallel=True)(lambda a: a.sum())(np.ones(64))\n" if start_pool_first else "")
            + "r = threads.inference_spin()\n"
            "print(r, os.environ.get('GOMP_SPINCOUNT'), threads.spinning_workers())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.split()


def test_inference_spin_sets_the_spin_count_before_the_pool_starts():
    assert _spin_probe({}) == ["True", threads.INFERENCE_SPINCOUNT, "True"]


def test_inference_spin_keeps_the_users_setting():
    assert _spin_probe({"GOMP_SPINCOUNT": "0"}) == ["False", "0", "False"]
    assert _spin_probe({"GOMP_SPINCOUNT": "10k"}) == ["True", "10k", "True"]


def test_inference_spin_changes_nothing_once_the_pool_runs():
    """libgomp read its environment when the pool started: a later setting would be a lie."""
    assert _spin_probe({}, start_pool_first=True) == ["False", "None", "False"]


def test_packed_products_go_parallel_sooner_with_spinning_workers(monkeypatch):
    from backends.numba_backend import packed

    monkeypatch.setattr(threads, "_SPINNING", True)
    assert packed._min_macs() == packed.SPINNING_MIN_MACS
    monkeypatch.setattr(threads, "_SPINNING", False)
    assert packed._min_macs() == packed.PARALLEL_MIN_MACS


def _heap_probe(env_extra):
    env = dict(os.environ, **env_extra)
    code = "from backends.memory import keep_freed_memory; print(keep_freed_memory(), keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_keeps_freed_memory_in_the_heap():
    """glibc accepts the heap policy (once per process); NANOCHAT_KEEP_HEAP=0 leaves its defaults."""
    assert _heap_probe({}) == ["True", "True"]
    assert _heap_probe({"NANOCHAT_KEEP_HEAP": "0"}) == ["False", "False"]


def test_compile_notice_for_inference_kernels(monkeypatch, tmp_path):
    """The inference commands look for the fused block kernels, not just any cached kernel."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "linear._fold_group-1.py311.nbi").write_bytes(b"")
    said = []
    assert threads.compile_notice("numba", said.append, threads.INFERENCE_KERNELS)
    (tmp_path / "x" / (threads.INFERENCE_KERNELS + "_layer-116.py311.nbi")).write_bytes(b"")
    assert not threads.compile_notice("numba", said.append, threads.INFERENCE_KERNELS)
    assert len(said) == 1
