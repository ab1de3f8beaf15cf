"""What the server tests share: a tiny random model with a real tokenizer, a server on loopback
in a thread, and a per-test time limit."""
from __future__ import annotations

import contextlib
import functools
import signal
import threading
import time

import httpx

CONFIG = ["vocab_size=320", "dim=64", "n_layers=2", "n_heads=4", "n_kv_heads=2", "ffn_hidden=128", "group_size=64",
          "seq_len=256"]
BACKEND = "numba"


@functools.lru_cache(maxsize=None)
def tokenizer_json():
    from nanochat.data.tokenizer import Tokenizer

    lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # café € 🎉 ok\n" for i in range(300)]
    return Tokenizer.train(lines, vocab_size=300).to_json_str()


def loaded_model(seed=0):
    from nanochat.config import load_config
    from nanochat.infer.engine import random_model

    loaded = random_model(load_config("tiny", CONFIG), seed)
    loaded.tokenizer_json = tokenizer_json()
    return loaded


def new_engine(seed=0):
    from nanochat.infer.engine import Engine

    return Engine(loaded_model(seed), BACKEND)


class Server:
    """A uvicorn server for ``app`` on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, app, wait_ready=True, timeout=60.0):
        import uvicorn

        from nanochat.cli.serve import bind

        self.app = app
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2,
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        if wait_ready:
            self.wait_ready(deadline - time.monotonic())

    def wait_ready(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/health", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not become ready")
            time.sleep(0.05)

    @property
    def state(self):
        return self.app.state.serve

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)


class TimeLimit(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """Raise ``TimeLimit`` in the main thread after ``seconds`` (so no test can hang CI)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise TimeLimit(f"the test took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def sse_events(raw: bytes):
    """The ``data:`` payloads of an SSE body, checking its framing (events end with a blank line)."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), text[-80:]
    events = text[:-2].split("\n\n")
    out = []
    for event in events:
        lines = event.split("\n")
        assert len(lines) == 1 and lines[0].startswith("data: "), event[:200]
        out.append(lines[0][len("data: "):])
    return out
