"""Load benchmark of ``python -m nanochat.serve`` (not a test): concurrent streaming clients on loopback.

    .venv/bin/python benchmarks/serve/load.py                       # tiny and nano_125m, 1/8/32 clients
    .venv/bin/python benchmarks/serve/load.py --presets tiny --clients 1 8 --max-tokens 32 --json out.json

For each preset a random-weight model of that shape (decode time does not depend on the weight
values) is written as GGUF with a byte-level BPE tokenizer and served by a server subprocess
(``--max-batch`` = the largest client count). Each client sends streaming ``/v1/completions``
requests one after the other: a prompt of ``--prompt-tokens`` random token ids,
``--max-tokens`` new tokens (``ignore_eos``, so every request generates exactly that many),
temperature 0.8, ``logprobs: 0`` so every token arrives in its own SSE chunk. Measured per level:
requests completed (every one must), aggregate tokens/s (all completion tokens / wall time of
the level), time to first token (request sent -> first token chunk) and inter-token latency
(gaps between a request's token chunks), p50 and p99, and the mean decode batch size the server
reports in /metrics. The client runs in this process (asyncio + httpx), the server in another.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def tokenizer_json(vocab_size=4096):
    """The default corpus's cached tokenizer when there is one, else a BPE trained on a sample
    of the Python standard library (a few seconds)."""
    from nanochat.data.tokenizer import Tokenizer, resolve_cache_dir

    for cached in sorted((resolve_cache_dir() / "data").glob(f"stdlib-*-v{vocab_size}/tokenizer.json")):
        return Tokenizer.load(cached).to_json_str()
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:150]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return Tokenizer.train(texts, vocab_size=vocab_size).to_json_str()


def write_model(preset, path, tok_json):
    from nanochat.config import load_config
    from nanochat.infer.engine import random_model
    from nanochat.io import gguf as gguf_io

    # the multi-token-prediction heads are training-only: the served shape is the same without them
    loaded = random_model(load_config(preset, ["mtp_n_tokens=0"]), seed=0)
    loaded.tokenizer_json = tok_json
    gguf_io.write_loaded(path, loaded)


class Served:
    def __init__(self, model, backend, max_batch, max_queue):
        cmd = [sys.executable, "-m", "nanochat.serve", "--model", str(model), "--port", "0", "--backend", backend,
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.close()
            raise RuntimeError(f"the server did not start: {line}{self.proc.stderr.read()}")
        self.url = f"http://127.0.0.1:{m.group(1)}"
        import httpx

        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("the server did not become ready")
            time.sleep(0.2)

    def batch_stats(self):
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=30).text
        total = float(re.search(r"^nanochat_batch_size_sum (\S+)", text, re.M).group(1))
        count = float(re.search(r"^nanochat_batch_size_count (\S+)", text, re.M).group(1))
        return total, count

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.proc.stderr.close()


async def one_request(client, url, prompt, max_tokens, seed):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed, "stream": True,
            "ignore_eos": True, "logprobs": 0, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, usage, done = [], None, False
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "error": (await r.aread())[:200].decode(errors="replace")}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            msg = json.loads(data)
            if msg.get("usage"):
                usage = msg["usage"]
            for choice in msg.get("choices", []):
                lp = choice.get("logprobs")
                if lp and lp.get("tokens"):
                    stamps.extend([time.perf_counter()] * len(lp["tokens"]))
    n = usage["completion_tokens"] if usage else 0
    ok = done and n == max_tokens and len(stamps) == n
    return {"ok": ok, "tokens": n, "ttft": stamps[0] - t0 if stamps else None, "itl": list(np.diff(stamps)),
            "seconds": time.perf_counter() - t0}


async def level(url, clients, per_client, prompt_tokens, max_tokens, vocab, seed):
    import httpx

    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker(w):
            out = []
            for i in range(per_client):
                prompt = [int(t) for t in rng.integers(1, vocab, prompt_tokens)]
                out.append(await one_request(client, url, prompt, max_tokens, seed + 1000 * w + i))
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    good = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in good]
    itl = [x for r in good for x in r["itl"]]
    tokens = sum(r["tokens"] for r in good)
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "completed": len(good),
            "failed": [r for r in results if not r["ok"]][:3], "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "nano_125m"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=16,
                   help="requests per level, split over the clients, at least one each (16)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--backend", default="numba")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    tok_json = tokenizer_json()
    from nanochat.data.tokenizer import Tokenizer

    vocab = Tokenizer.from_json_str(tok_json).vocab_size
    results = {"machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                           "load_before": os.getloadavg()}, "presets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            model = Path(tmp) / f"{preset}.gguf"
            write_model(preset, model, tok_json)
            server = Served(model, args.backend, max(args.clients), max(args.clients) * 2)
            try:
                asyncio.run(level(server.url, 1, 1, args.prompt_tokens, 4, vocab, 0))  # warm-up (JIT, caches)
                rows = []
                for c in args.clients:
                    before = server.batch_stats()
                    per_client = max(1, -(-args.requests // c))
                    row = asyncio.run(level(server.url, c, per_client, args.prompt_tokens, args.max_tokens, vocab, c))
                    after = server.batch_stats()
                    row["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                    row["load_avg_1m"] = os.getloadavg()[0]
                    rows.append(row)
                    print(f"{preset:>10} {c:>3} clients: {row['completed']}/{row['requests']} requests, "
                          f"{row['tokens_per_s']:7.1f} tokens/s, TTFT p50/p99 {row['ttft_p50_ms']:.0f}/"
                          f"{row['ttft_p99_ms']:.0f} ms, ITL p50/p99 {row['itl_p50_ms']:.0f}/{row['itl_p99_ms']:.0f} ms, "
                          f"mean batch {row['mean_batch']:.1f}, load {row['load_avg_1m']:.1f}", flush=True)
                results["presets"][preset] = rows
            finally:
                server.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    bad = [(k, r["clients"]) for k, rows in results["presets"].items() for r in rows if r["completed"] != r["requests"]]
    if bad:
        print(f"requests lost at {bad}", file=sys.stderr)
        return 1
    return 0


def _cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
