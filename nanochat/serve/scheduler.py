"""Continuous batching: one thread decodes every active sequence with one forward per step.

Each step of the scheduler thread:

1. drops cancelled sequences (their caches are freed with the ``Sequence`` objects) and admits
   waiting jobs while fewer than ``max_batch`` sequences are active;
2. prefills at most ``prefill_chunk`` prompt tokens over the sequences still being prefilled,
   oldest first, so a long prompt costs the others one chunk's time per step, not its whole
   length; a sequence whose prompt is complete samples its first token;
3. runs ONE ``engine.decode`` over every sequence that has a token to feed (packed GEMM over
   the batch, each sequence at its own position), samples each one's next token and sends it
   to its job's sink; a sequence that ends (end-of-text, a stop string, ``max_tokens``) is
   removed at once.

Jobs come from the server's event loop (``submit``, ``cancel``); events go back through the
job's ``sink``, a callable the scheduler thread calls (the app passes one that hands the event
to its asyncio loop). Sampling per sequence is ``nanochat.infer.sampling.sample_next`` with a
generator seeded by the job, in the same order of calls as ``Engine.generate``, so a job gives
the tokens ``Engine.generate`` gives up to the float tolerance of batched products
(docs/serve.md).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from nanochat.infer.sampling import SamplingParams, sample_next
from nanochat.infer.text import TextStream

log = logging.getLogger("nanochat.serve")


class QueueFull(Exception):
    """The waiting queue cannot take the jobs (the server answers 429)."""


# --------------------------------------------------------------------------- events
@dataclass
class TokenEvent:
    """One generated token: the text it made safe to show (may be empty), and its logprobs."""

    index: int
    token_id: int
    text: str
    logprob: float | None = None
    top: list | None = None        # [(token_id, logprob)] most likely first


@dataclass
class PromptLogprobsEvent:
    """Logprobs of the prompt tokens (echo): ``logprobs[0]`` is None (no context)."""

    index: int
    token_ids: list
    logprobs: list
    top: list


@dataclass
class DoneEvent:
    index: int
    finish_reason: str             # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    text: str = ""                 # the last text released at the end (a held-back tail)


@dataclass
class ErrorEvent:
    index: int
    message: str


@dataclass
class Job:
    """One sequence to generate (one choice of one request)."""

    prompt_ids: list
    max_tokens: int
    params: SamplingParams
    sink: Callable[[object], None]
    stop: tuple = ()
    stop_at_eot: bool = True
    logprobs: int | None = None     # None: none; k >= 0: the chosen token's logprob and k alternatives
    prompt_logprobs: bool = False   # logprobs of the prompt tokens (echo)
    index: int = 0                  # the choice index events carry
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


class _Active:
    __slots__ = ("job", "seq", "done", "rng", "history", "stream", "feed", "generated", "t_first", "prev_row",
                 "p_lp", "p_top")

    def __init__(self, job, seq, tokenizer):
        self.job, self.seq = job, seq
        self.done = 0                   # prompt tokens prefilled
        self.rng = np.random.default_rng(job.params.seed)
        self.history = list(job.prompt_ids)
        self.stream = TextStream(tokenizer.token_bytes, job.stop)
        self.feed = None                # the token to decode next
        self.generated = 0
        self.t_first = None
        self.prev_row = None            # last prefill row (prompt logprobs across chunks)
        self.p_lp, self.p_top = [None], [None]


def _logprobs(row, token, k):
    """log-softmax of ``row`` (float64): the token's logprob and the ``k`` most likely ids."""
    z = row.astype(np.float64)
    finite = np.isfinite(z)
    m = z[finite].max()
    lse = m + np.log(np.exp(z[finite] - m).sum())
    lp = z - lse
    top = []
    if k:
        k = min(k, int(finite.sum()))
        ids = np.argpartition(-lp, k - 1)[:k]
        ids = ids[np.lexsort((ids, -lp[ids]))]
        top = [(int(i), float(lp[i])) for i in ids]
    return float(lp[token]), top


class Scheduler:
    """Runs ``engine`` for many jobs at once in one background thread (see the module doc)."""

    def __init__(self, engine, max_batch=8, max_queue=64, prefill_chunk=128, metrics=None, step_delay=0.0):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1 and max_queue >= 0.")
        self.engine = engine
        self.tokenizer = engine.require_tokenizer()
        self.vocab_limit = min(self.tokenizer.vocab_size, engine.cfg.vocab_size)
        self.max_batch, self.max_queue, self.prefill_chunk = int(max_batch), int(max_queue), int(prefill_chunk)
        self.metrics = metrics
        self.step_delay = float(step_delay)   # seconds to sleep per step (tests and demos slow it down)
        self._cond = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._active: list[_Active] = []
        self._stopping = False
        self._thread = None
        self.steps = 0

    # ----------------------------------------------------------- called from other threads
    @property
    def queue_depth(self):
        return len(self._waiting)

    @property
    def active_count(self):
        return len(self._active)

    def submit(self, jobs):
        """Queue ``jobs`` (all or none); raises ``QueueFull`` when the queue cannot take them."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down.")
            room = self.max_queue + max(0, self.max_batch - len(self._active)) - len(self._waiting)
            if len(jobs) > room:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting "
                                f"(queue limit {self.max_queue}); retry later.")
            self._waiting.extend(jobs)
            self._cond.notify()

    def cancel(self, jobs):
        """Mark ``jobs`` cancelled; the scheduler drops them before its next step."""
        for job in jobs:
            job.cancelled = True
        with self._cond:
            self._cond.notify()

    def start(self):
        self._thread = threading.Thread(target=self._run, name="nanochat-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout=10.0):
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for a in self._active:
            self._send(a.job, ErrorEvent(a.job.index, "the server is shutting down."))
        for job in self._waiting:
            self._send(job, ErrorEvent(job.index, "the server is shutting down."))
        self._active, self._waiting = [], collections.deque()

    # ---------------------------------------------------------------- the scheduler thread
    def _run(self):
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    return
                self._drop_cancelled()
                while self._waiting and len(self._active) < self.max_batch:
                    job = self._waiting.popleft()
                    self._active.append(_Active(job, None, self.tokenizer))
            try:
                self._step()
            except Exception as exc:  # a bug or an engine failure must not kill the server
                log.exception("scheduler step failed")
                for a in self._active:
                    self._send(a.job, ErrorEvent(a.job.index, f"generation failed: {type(exc).__name__}: {exc}"))
                self._active = []
            self.steps += 1
            if self.metrics is not None:
                self.metrics.set_depth(len(self._waiting), len(self._active))
            if self.step_delay:
                time.sleep(self.step_delay)

    def _drop_cancelled(self):
        gone = [a for a in self._active if a.job.cancelled]
        if gone:
            self._active = [a for a in self._active if not a.job.cancelled]
        if any(j.cancelled for j in self._waiting):
            gone += [_Active(j, None, self.tokenizer) for j in self._waiting if j.cancelled]
            self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)
        for a in gone:
            self._send(a.job, DoneEvent(a.job.index, "cancelled", len(a.job.prompt_ids), a.generated))
            if self.metrics is not None:
                self.metrics.cancelled.inc()
                self.metrics.finished(a.done, a.generated, 0.0)

    def _send(self, job, event):
        try:
            job.sink(event)
        except Exception:  # a sink whose loop has closed: the client is gone
            job.cancelled = True

    def _step(self):
        eng = self.engine
        budget = self.prefill_chunk
        for a in list(self._active):
            if budget <= 0:
                break
            if a.job.cancelled or a.feed is not None or a.t_first is not None:
                continue
            if a.seq is None:
                a.seq = eng.new_sequence(record=False)  # never rewound: no DeltaNet replay inputs kept
            try:
                budget -= self._prefill(a, budget)
            except Exception as exc:
                log.exception("prefill failed")
                self._finish(a, None, error=f"prefill failed: {type(exc).__name__}: {exc}")
        batch = [a for a in self._active if a.feed is not None and not a.job.cancelled]
        if not batch:
            return
        t0 = time.perf_counter()
        logits = eng.decode([a.seq for a in batch], [a.feed for a in batch])
        if self.metrics is not None:
            self.metrics.step(len(batch), time.perf_counter() - t0)
        for a, row in zip(batch, logits):
            a.feed = None
            self._accept(a, row)

    def _prefill(self, a, budget):
        job, ids = a.job, a.job.prompt_ids
        if job.max_tokens == 0 and not job.prompt_logprobs:  # nothing to compute
            self._finish(a, "length")
            return 0
        n = min(budget, len(ids) - a.done)
        chunk = ids[a.done:a.done + n]
        if job.prompt_logprobs:
            rows = self.engine.prefill(a.seq, chunk, all_logits=True)
            k = job.logprobs or 0
            for j, tok in enumerate(chunk):
                prev = a.prev_row if j == 0 else rows[j - 1]
                if prev is None:
                    continue
                lp, top = _logprobs(self._mask(prev), tok, k)
                a.p_lp.append(lp)
                a.p_top.append(top)
            a.prev_row = rows[-1]
            last = rows[-1]
        else:
            last = self.engine.prefill(a.seq, chunk)
        a.done += n
        if a.done == len(ids):
            a.prev_row = None
            if job.prompt_logprobs:
                self._send(job, PromptLogprobsEvent(job.index, list(ids), a.p_lp, a.p_top))
            if job.max_tokens == 0:
                self._finish(a, "length")
            else:
                self._accept(a, last)
        return n

    def _mask(self, row):
        if self.vocab_limit < row.size:
            row = row.copy()
            row[self.vocab_limit:] = -np.inf
        return row

    def _accept(self, a, row):
        """Sample the next token of ``a`` from ``row`` and send it; end ``a`` when it is done."""
        job = a.job
        row = self._mask(row)
        token = sample_next(row, a.history, job.params, a.rng)
        now = time.perf_counter()
        if a.t_first is None:
            a.t_first = now
            if self.metrics is not None:
                self.metrics.first_token(now - job.submitted)
        if job.stop_at_eot and token == self.tokenizer.eot_id:
            self._finish(a, "stop")
            return
        a.history.append(token)
        a.generated += 1
        lp = top = None
        if job.logprobs is not None:
            lp, top = _logprobs(row, token, job.logprobs)
        text = a.stream.push(token)
        self._send(job, TokenEvent(job.index, token, text, lp, top))
        if a.stream.stopped:
            self._finish(a, "stop")
        elif a.generated >= job.max_tokens:
            self._finish(a, "length")
        else:
            a.feed = token

    def _finish(self, a, reason, error=None):
        if a in self._active:
            self._active.remove(a)
        a.seq = None  # frees the caches
        job = a.job
        if error is not None:
            self._send(job, ErrorEvent(job.index, error))
            return
        tail = a.stream.finish() if reason != "stop" or not a.stream.stopped else ""
        self._send(job, DoneEvent(job.index, reason, len(job.prompt_ids), a.generated, tail))
        if self.metrics is not None:
            elapsed = time.perf_counter() - (a.t_first or time.perf_counter())
            self.metrics.finished(len(job.prompt_ids), a.generated, elapsed)
