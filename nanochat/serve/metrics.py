"""Prometheus metrics of the server (``GET /metrics``), on a registry of its own per app."""
from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
THROUGHPUT_WINDOW = 10.0  # seconds over which the aggregate tokens/s gauge is averaged


class ServeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nanochat_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("nanochat_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("nanochat_generation_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("nanochat_cancelled_sequences", "sequences cancelled (client gone)", registry=r)
        self.ttft = Histogram("nanochat_time_to_first_token_seconds", "from submission to the first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.request_rate = Histogram("nanochat_request_tokens_per_second",
                                      "decode speed of one finished sequence (tokens after the first / seconds)",
                                      buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r)
        self.step_seconds = Histogram("nanochat_decode_step_seconds", "one batched decode forward",
                                      buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.batch_size = Histogram("nanochat_batch_size", "sequences in one batched decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_depth = Gauge("nanochat_queue_depth", "requests waiting for a batch slot", registry=r)
        self.active = Gauge("nanochat_active_sequences", "sequences being prefilled or decoded", registry=r)
        self.tokens_per_second = Gauge("nanochat_generation_tokens_per_second",
                                       f"tokens generated per second over the last {THROUGHPUT_WINDOW:g} s",
                                       registry=r)
        self.tokens_per_second.set_function(self._throughput)
        self.ready = Gauge("nanochat_model_ready", "1 when the model is loaded", registry=r)
        self._recent = collections.deque()
        self._lock = threading.Lock()

    # called by the scheduler thread
    def step(self, batch, seconds):
        self.batch_size.observe(batch)
        self.step_seconds.observe(seconds)
        with self._lock:
            self._recent.append((time.monotonic(), batch))

    def first_token(self, seconds):
        self.ttft.observe(seconds)

    def finished(self, prompt_tokens, generated, decode_seconds):
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        if generated > 1 and decode_seconds > 0:
            self.request_rate.observe((generated - 1) / decode_seconds)

    def set_depth(self, waiting, active):
        self.queue_depth.set(waiting)
        self.active.set(active)

    def _throughput(self):
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / THROUGHPUT_WINDOW

    def render(self):
        return generate_latest(self.registry)
