"""An OpenAI-compatible HTTP server with continuous batching and a web chat page.

``python -m nanochat.serve --model MODEL.gguf|RUN_DIR`` (see ``nanochat.cli.serve`` and docs/serve.md).

- ``nanochat.serve.scheduler``: one thread steps every active sequence with one batched
  ``Engine.decode`` per step, admits new requests between steps with chunked prefill;
- ``nanochat.serve.protocol``: request validation (OpenAI wire format), the chat template, errors;
- ``nanochat.serve.app``: the FastAPI application (routes, streaming, metrics, the chat page).
"""
