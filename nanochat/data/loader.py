"""Batch loaders over a 1-D token array (a memmap shard or any integer array).

Training batches are ``[B, T+1]`` int64 windows at random offsets. The offsets of step
``s`` come from ``np.random.default_rng([seed, s])``, so any step's batch can be rebuilt
from (seed, step) alone: the data cursor saved in a checkpoint is just the step number,
and resuming reproduces the same continuation bit for bit.

``AsyncLoader`` builds the same batches in background threads (numpy's gather and
widening copy run without the GIL, and page faults on a cold memmap block only the
worker) and hands them out in step order through a bounded window, recording how long
the consumer waited.
"""
from __future__ import annotations

import threading
import time
from typing import Iterator

import numpy as np

BATCH_DTYPE = np.int64


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_tokens(tokens, seq_len: int) -> None:
    if getattr(tokens, "ndim", None) != 1 or not np.issubdtype(tokens.dtype, np.integer):
        shape = getattr(tokens, "shape", None)
        dtype = getattr(tokens, "dtype", type(tokens).__name__)
        raise ValueError(f"tokens must be a 1-D integer array, got shape {shape} dtype {dtype}.")
    if tokens.shape[0] < seq_len + 1:
        raise ValueError(
            f"tokens hold {tokens.shape[0]} ids, fewer than one window of seq_len + 1 = {seq_len + 1}."
        )


class BatchLoader:
    """Synchronous training batches: ``next(loader)`` is the batch of step ``loader.step``.

    Infinite iterator of int64 arrays ``[batch_size, seq_len + 1]``; inputs are
    ``batch[:, :-1]`` and targets ``batch[:, 1:]``. ``wait_seconds`` totals the time
    spent building batches (the consumer waits for all of it).
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int, start_step: int = 0,
                 shard: tuple = (0, 1)):
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.seed = _check_int("seed", seed, 0)
        self.step = _check_int("start_step", start_step, 0)
        # Data parallelism: (rank, world). Each step draws world * batch_size windows and this
        # rank takes rows [rank * batch_size, (rank + 1) * batch_size): disjoint slices whose
        # concatenation over ranks is the batch_size * world batch of a single process.
        rank, world = shard
        self.world = _check_int("world size", world, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world:
            raise ValueError(f"rank must lie in [0, {self.world}), got {self.rank}.")
        _check_tokens(tokens, self.seq_len)
        self.tokens = tokens
        # Strided view of every window (no copy): a batch is one gather of B rows.
        self._windows = np.lib.stride_tricks.sliding_window_view(tokens, self.seq_len + 1)
        self.wait_seconds = 0.0

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def offsets_at(self, step: int) -> np.ndarray:
        """Window start offsets of ``step``: B draws from [0, num_tokens - seq_len)."""
        rng = np.random.default_rng([self.seed, _check_int("step", step, 0)])
        offsets = rng.integers(0, self.num_tokens - self.seq_len, size=self.batch_size * self.world)
        return offsets[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def batch_at(self, step: int) -> np.ndarray:
        """The batch of any step, independent of the iterator's position."""
        return self._windows[self.offsets_at(step)].astype(BATCH_DTYPE)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        t0 = time.perf_counter()
        batch = self.batch_at(self.step)
        self.step += 1
        self.wait_seconds += time.perf_counter() - t0
        return batch

    def state_dict(self) -> dict:
        """The data cursor: the next step plus what it means (seed, shapes, data size)."""
        return {
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_tokens": self.num_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved cursor; the seed, shapes and data size must match.

        To change any of them on purpose, build a new loader with ``start_step``.
        """
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"loader state must be a dict with a 'step' field, got {state!r}.")
        mine = self.state_dict()
        for key in ("seed", "batch_size", "seq_len", "num_tokens"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"loader state field {key!r} is {state[key]!r} but this loader has {mine[key]!r}; "
                    f"build a new loader with start_step to change it."
                )
        self.step = _check_int("step", state["step"], 0)


class _PrefetchPool:
    """Worker threads that build the batches of steps first_step, first_step+1, ...

    A semaphore with ``prefetch`` slots bounds the steps claimed but not yet taken;
    finished batches wait in a dict keyed by step until ``take`` asks for them.
    """

    def __init__(self, source: BatchLoader, first_step: int, workers: int, prefetch: int):
        self._source = source
        self._stop = threading.Event()
        self._slots = threading.Semaphore(prefetch)
        self._cond = threading.Condition()
        self._ready: dict[int, tuple] = {}
        self._next_claim = first_step
        self._threads = [
            threading.Thread(target=self._work, name=f"nanochat-loader-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            self._slots.acquire()
            if self._stop.is_set():
                return
            with self._cond:
                step = self._next_claim
                self._next_claim += 1
            try:
                item = (self._source.batch_at(step), None)
            except BaseException as exc:  # handed to the consumer, never lost
                item = (None, exc)
            with self._cond:
                self._ready[step] = item
                self._cond.notify_all()
            if item[1] is not None:
                return

    def take(self, step: int) -> tuple:
        """(batch, exception) of ``step``, blocking until a worker has produced it."""
        with self._cond:
            while step not in self._ready:
                if not any(t.is_alive() for t in self._threads):
                    raise RuntimeError(f"AsyncLoader workers stopped before producing step {step}.")
                self._cond.wait(timeout=1.0)
            item = self._ready.pop(step)
        self._slots.release()
        return item

    def stop(self) -> None:
        self._stop.set()
        for _ in self._threads:
            self._slots.release()  # wake every worker blocked on a slot so it sees the stop
        for t in self._threads:
            t.join(timeout=10.0)

    def alive_threads(self) -> int:
        return sum(t.is_alive() for t in self._threads)


class AsyncLoader:
    """``BatchLoader``'s batches, same order, built ahead by ``workers`` daemon threads.

    At most ``prefetch`` batches are claimed but not yet consumed. Worker exceptions are
    re-raised in the consumer at the step that failed (the loader then closes itself).
    ``wait_seconds`` totals the time the consumer blocked in ``next``. Use as a context
    manager or call ``close()``; threads start on the first ``next``.
    """

    def __init__(
        self,
        tokens,
        batch_size: int,
        seq_len: int,
        seed: int,
        start_step: int = 0,
        workers: int = 2,
        prefetch: int = 4,
        shard: tuple = (0, 1),
    ):
        self._pool: _PrefetchPool | None = None
        self._closed = False
        self._source = BatchLoader(tokens, batch_size, seq_len, seed, start_step, shard=shard)
        self.workers = _check_int("workers", workers, 1)
        self.prefetch = _check_int("prefetch", prefetch, 1)
        self.step = self._source.step
        self.wait_seconds = 0.0

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        if self._closed:
            raise RuntimeError("AsyncLoader is closed; build a new one to read more batches.")
        if self._pool is None:
            self._pool = _PrefetchPool(self._source, self.step, self.workers, self.prefetch)
        t0 = time.perf_counter()
        batch, exc = self._pool.take(self.step)
        self.wait_seconds += time.perf_counter() - t0
        if exc is not None:
            self.close()
            raise exc
        self.step += 1
        return batch

    def batch_at(self, step: int) -> np.ndarray:
        """The batch of any step, built in the caller's thread."""
        return self._source.batch_at(step)

    def alive_threads(self) -> int:
        """Worker threads still running (0 before the first batch and after close)."""
        return self._pool.alive_threads() if self._pool is not None else 0

    def state_dict(self) -> dict:
        state = self._source.state_dict()
        state["step"] = self.step
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved cursor (prefetched batches are dropped)."""
        self._source.load_state_dict(state)
        self._stop_pool()
        self.step = self._source.step

    def _stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    def close(self) -> None:
        """Stop and join the worker threads; idempotent."""
        self._closed = True
        self._stop_pool()

    def __enter__(self) -> "AsyncLoader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def val_batches(tokens, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[np.ndarray]:
    """Validation batches in order: windows ``tokens[i*T : i*T + T + 1]`` for i = 0, 1, ...

    Windows overlap by one token, so every token after the first is a target exactly
    once. The last batch may have fewer than ``batch_size`` rows. Stops after
    ``max_batches`` batches when given.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    if max_batches is not None:
        max_batches = _check_int("max_batches", max_batches, 1)
    _check_tokens(tokens, seq_len)
    n_windows = (int(tokens.shape[0]) - 1) // seq_len
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    width = seq_len + 1

    def generate():
        for b in range(n_batches):
            first = b * batch_size
            rows = min(batch_size, n_windows - first)
            out = np.empty((rows, width), dtype=BATCH_DTYPE)
            for r in range(rows):
                start = (first + r) * seq_len
                out[r] = tokens[start : start + width]
            yield out

    return generate()
