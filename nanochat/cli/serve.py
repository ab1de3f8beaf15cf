"""``python -m nanochat.serve``: an OpenAI-compatible HTTP server and a web chat page for a model.

    python -m nanochat.serve --model model.gguf --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "def main():", "max_tokens": 32, "temperature": 0}'

The server listens at once and loads the model in the background (``GET /health`` answers 503
until it is ready, then 200). Needs the ``serve`` extra: ``pip install -e '.[serve]'``. Bad
input (a missing model, a port that cannot be bound, a model that fails to load) is one
``error:`` line on stderr and exit status 2. Design and limits: docs/serve.md.
"""
from __future__ import annotations

import os
import socket
import sys

from nanochat.cli.common import (EXIT_BAD_INPUT, OneLineParser, add_backend_argument, check_model_path, fail,
                                 non_negative_int, say_if_compiling)


def positive_int(text):
    value = non_negative_int(text)
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser():
    p = OneLineParser(prog="python -m nanochat.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a .gguf file or a checkpoint (run) directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=non_negative_int, default=8000, help="port (8000; 0 = any free port)")
    add_backend_argument(p)
    p.add_argument("--max-batch", type=positive_int, default=16,
                   help="sequences decoded together in one step (16)")
    p.add_argument("--max-queue", type=non_negative_int, default=64,
                   help="requests waiting for a batch slot before new ones get 429 (64)")
    p.add_argument("--prefill-chunk", type=positive_int, default=128,
                   help="prompt tokens prefilled per scheduler step, so long prompts do not stall decoding (128)")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $NANOCHAT_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the file or run name)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="request body limit (1 MiB)")
    p.add_argument("--dequantized", action="store_true",
                   help="float32 matmuls with dequantized weights instead of the packed kernels")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (info)")
    return p


def bind(host, port):
    """A listening socket on ``host:port`` (IPv6 when ``host`` has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
    return sock


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from nanochat.serve.app import create_app
    except ImportError as exc:
        return fail(f"the server needs the 'serve' extra ({exc.name} is missing): pip install -e '.[serve]'")
    from nanochat.infer.engine import Engine

    try:
        check_model_path(args.model)
        sock = bind(args.host, args.port)
    except ValueError as exc:
        return fail(exc)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    server = None

    def on_loaded(state):
        if state.error is not None and server is not None:
            server.should_exit = True
        elif state.error is None:
            print(f"model {state.model_id} ready: chat page http://{shown}:{port}/ , API http://{shown}:{port}/v1",
                  file=sys.stderr, flush=True)

    def make_engine():
        engine = Engine.from_path(args.model, args.backend, dequantized=args.dequantized)
        say_if_compiling(engine)
        return engine

    app = create_app(make_engine,
                     model_id=args.model_name, api_key=args.api_key, max_batch=args.max_batch,
                     max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, max_body_bytes=args.max_body_bytes,
                     on_loaded=on_loaded)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5, access_log=False)
    server = uvicorn.Server(config)
    print(f"serving on http://{shown}:{port} (loading {args.model}; GET /health answers 200 when ready)",
          file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled once it has shut down
        pass
    finally:
        sock.close()
    state = app.state.serve
    if state.error is not None:
        return fail(f"the model failed to load: {state.error}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
