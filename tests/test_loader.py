"""Training and validation batch loaders: determinism, resume, async == sync, shutdown."""
import threading
import time

import numpy as np
import pytest

from nanochat.data.loader import AsyncLoader, BatchLoader, val_batches


@pytest.fixture
def tokens(rng):
    return rng.integers(0, 4096, size=20_000).astype(np.uint16)


@pytest.fixture
def memmap_tokens(tmp_path, tokens):
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r")


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_windows_of_the_token_stream():
    tokens = np.arange(1000, dtype=np.uint16)
    loader = BatchLoader(tokens, batch_size=8, seq_len=16, seed=3)
    for batch in take(loader, 20):
        assert batch.shape == (8, 17) and batch.dtype == np.int64
        # each row is a contiguous window, wholly inside the stream
        np.testing.assert_array_equal(batch - batch[:, :1], np.broadcast_to(np.arange(17), (8, 17)))
        assert batch.min() >= 0 and batch.max() <= 999
    offsets = np.concatenate([loader.offsets_at(s) for s in range(500)])
    assert offsets.min() == 0 and offsets.max() == 1000 - 17  # every offset reachable


def test_same_seed_same_batches_different_seed_different(memmap_tokens):
    a = take(BatchLoader(memmap_tokens, 4, 32, seed=7), 10)
    b = take(BatchLoader(memmap_tokens, 4, 32, seed=7), 10)
    c = take(BatchLoader(memmap_tokens, 4, 32, seed=8), 10)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))
    assert not np.array_equal(a[0], a[1])


def test_resume_from_start_step_and_state_dict(memmap_tokens):
    straight = take(BatchLoader(memmap_tokens, 4, 32, seed=11), 30)
    resumed = take(BatchLoader(memmap_tokens, 4, 32, seed=11, start_step=17), 13)
    for x, y in zip(straight[17:], resumed):
        np.testing.assert_array_equal(x, y)

    first = BatchLoader(memmap_tokens, 4, 32, seed=11)
    take(first, 9)
    state = first.state_dict()
    assert state == {"step": 9, "seed": 11, "batch_size": 4, "seq_len": 32, "num_tokens": 20_000}
    second = BatchLoader(memmap_tokens, 4, 32, seed=11)
    second.load_state_dict(state)
    np.testing.assert_array_equal(next(second), straight[9])
    np.testing.assert_array_equal(second.batch_at(3), straight[3])


def test_load_state_dict_rejects_a_different_stream(memmap_tokens):
    state = BatchLoader(memmap_tokens, 4, 32, seed=1).state_dict()
    with pytest.raises(ValueError, match="field 'seed' is 1 but this loader has 2"):
        BatchLoader(memmap_tokens, 4, 32, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="field 'seq_len'"):
        AsyncLoader(memmap_tokens, 4, 16, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="'step' field"):
        BatchLoader(memmap_tokens, 4, 32, seed=1).load_state_dict({"seed": 1})


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_async_matches_sync(memmap_tokens, workers):
    sync = take(BatchLoader(memmap_tokens, 8, 64, seed=5), 50)
    with AsyncLoader(memmap_tokens, 8, 64, seed=5, workers=workers, prefetch=3) as loader:
        got = take(loader, 50)
        assert loader.state_dict()["step"] == 50
    for x, y in zip(sync, got):
        np.testing.assert_array_equal(x, y)


def test_async_resume_and_load_state_dict(memmap_tokens):
    sync = take(BatchLoader(memmap_tokens, 4, 32, seed=9), 40)
    with AsyncLoader(memmap_tokens, 4, 32, seed=9, start_step=25, workers=2) as loader:
        for step in range(25, 40):
            np.testing.assert_array_equal(next(loader), sync[step])
    with AsyncLoader(memmap_tokens, 4, 32, seed=9, workers=3, prefetch=6) as loader:
        take(loader, 5)  # workers are now ahead of the consumer
        loader.load_state_dict({"step": 12, "seed": 9})
        np.testing.assert_array_equal(next(loader), sync[12])
        np.testing.assert_array_equal(next(loader), sync[13])


def test_async_prefetch_is_bounded(memmap_tokens, monkeypatch):
    built = []
    original = BatchLoader.batch_at

    def counting(self, step):
        built.append(step)
        return original(self, step)

    monkeypatch.setattr(BatchLoader, "batch_at", counting)
    with AsyncLoader(memmap_tokens, 2, 8, seed=0, workers=3, prefetch=4) as loader:
        next(loader)
        wait_for(lambda: len(built) >= 5)
        time.sleep(0.1)  # give the workers time to overrun, if they could
        assert sorted(built) == list(range(5))  # the consumed batch plus 4 in flight
        take(loader, 3)
        wait_for(lambda: len(built) >= 8)
        time.sleep(0.1)
        assert sorted(built) == list(range(8))


@pytest.mark.parametrize("workers", [1, 3])
def test_worker_exception_reaches_the_consumer(memmap_tokens, monkeypatch, workers):
    original = BatchLoader.batch_at

    def failing(self, step):
        if step == 6:
            raise KeyError("corrupt shard at step 6")
        return original(self, step)

    monkeypatch.setattr(BatchLoader, "batch_at", failing)
    loader = AsyncLoader(memmap_tokens, 2, 8, seed=0, workers=workers, prefetch=2)
    assert len(take(loader, 6)) == 6
    with pytest.raises(KeyError, match="corrupt shard at step 6"):
        next(loader)
    assert loader.alive_threads() == 0  # the loader closed itself
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_wait_seconds_records_consumer_blocking(memmap_tokens, monkeypatch):
    original = BatchLoader.batch_at

    def slow(self, step):
        time.sleep(0.02)
        return original(self, step)

    monkeypatch.setattr(BatchLoader, "batch_at", slow)
    with AsyncLoader(memmap_tokens, 2, 8, seed=0, workers=1, prefetch=2) as loader:
        assert loader.wait_seconds == 0.0
        take(loader, 10)  # the consumer is faster than the one slow worker: it waits
        assert loader.wait_seconds >= 0.1
    sync = BatchLoader(memmap_tokens, 2, 8, seed=0)
    take(sync, 5)
    assert sync.wait_seconds >= 0.1

    monkeypatch.setattr(BatchLoader, "batch_at", original)
    with AsyncLoader(memmap_tokens, 2, 8, seed=0, workers=2, prefetch=4) as loader:
        next(loader)
        before = loader.wait_seconds
        wait_for(lambda: len(loader._pool._ready) >= 3)  # a slow consumer: batches are ready
        take(loader, 3)
        assert loader.wait_seconds - before < 0.05


def test_close_stops_threads_and_is_idempotent(memmap_tokens):
    loader = AsyncLoader(memmap_tokens, 2, 8, seed=0, workers=3, prefetch=2)
    assert loader.alive_threads() == 0  # threads start lazily
    next(loader)
    threads = list(loader._pool._threads)
    assert all(t.daemon and t.is_alive() for t in threads)
    loader.close()
    loader.close()
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)
    with AsyncLoader(memmap_tokens, 2, 8, seed=0, workers=2) as ctx:
        next(ctx)
        threads = list(ctx._pool._threads)
    assert not any(t.is_alive() for t in threads)
    assert not [t for t in threading.enumerate() if t.name.startswith("nanochat-loader") and t.is_alive()]


def test_val_batches_cover_every_token_once():
    tokens = np.arange(1001, dtype=np.uint16)
    batches = list(val_batches(tokens, batch_size=4, seq_len=32))
    # (1001 - 1) // 32 = 31 windows: 7 full batches and one of 3 rows
    assert [b.shape[0] for b in batches] == [4] * 7 + [3]
    rows = np.concatenate(batches)
    assert rows.dtype == np.int64 and rows.shape == (31, 33)
    np.testing.assert_array_equal(rows[:, 1:].ravel(), np.arange(1, 31 * 32 + 1))  # targets once each
    np.testing.assert_array_equal(rows[:, 0], np.arange(31) * 32)
    again = list(val_batches(tokens, 4, 32, max_batches=2))
    assert len(again) == 2
    np.testing.assert_array_equal(again[1], batches[1])


def test_bad_arguments(tokens):
    with pytest.raises(ValueError, match="fewer than one window of seq_len \\+ 1 = 33"):
        BatchLoader(tokens[:32], 2, 32, seed=0)
    with pytest.raises(ValueError, match="1-D integer array"):
        BatchLoader(tokens.reshape(100, 200), 2, 8, seed=0)
    with pytest.raises(ValueError, match="1-D integer array"):
        BatchLoader(tokens.astype(np.float32), 2, 8, seed=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        BatchLoader(tokens, 0, 8, seed=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        BatchLoader(tokens, 2, 8, seed=-1)
    with pytest.raises(ValueError, match="start_step"):
        BatchLoader(tokens, 2, 8, seed=0, start_step=1.5)
    with pytest.raises(ValueError, match="workers must be"):
        AsyncLoader(tokens, 2, 8, seed=0, workers=0)
    with pytest.raises(ValueError, match="prefetch must be"):
        AsyncLoader(tokens, 2, 8, seed=0, prefetch=0)
    with pytest.raises(ValueError, match="fewer than one window"):
        list(val_batches(tokens[:5], 2, 8))
    with pytest.raises(ValueError, match="max_batches"):
        val_batches(tokens, 2, 8, max_batches=0)

