"""The FastAPI application: OpenAI-style routes, server-sent events, metrics and the chat page.

    app = create_app(engine)                      # an Engine, or a callable that loads one
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``GET /`` (the chat page), ``GET /health`` (503 while loading, 200 when ready),
``GET /metrics`` (Prometheus), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``. See docs/serve.md.
"""
from __future__ import annotations

import asyncio
import codecs
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import replace
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.serve.metrics import CONTENT_TYPE, ServeMetrics
from nanochat.serve.protocol import (CHAT_STOP, DEFAULT_COMPLETION_TOKENS, ApiError, parse_body, parse_chat,
                                     parse_completion, render_chat, token_text)
from nanochat.serve.scheduler import (DoneEvent, ErrorEvent, Job, PromptLogprobsEvent, QueueFull, Scheduler,
                                      TokenEvent)

log = logging.getLogger("nanochat.serve")
DEFAULT_MAX_BODY_BYTES = 1 << 20


class ServerState:
    """What the routes share: the engine and scheduler once loaded, the settings, the metrics."""

    def __init__(self, model_id, api_key, max_batch, max_queue, prefill_chunk, max_body_bytes, step_delay):
        self.model_id = model_id
        self.api_key = api_key
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_body_bytes = max_body_bytes
        self.step_delay = step_delay
        self.engine = None
        self.scheduler = None
        self.error = None            # why loading failed
        self.loaded = threading.Event()  # set when loading ended, either way
        self.created = int(time.time())
        self.metrics = ServeMetrics()

    @property
    def ready(self):
        return self.scheduler is not None

    def load(self, model):
        try:
            engine = model() if callable(model) else model
            engine.require_tokenizer()
            engine.warm_up()  # kernels compiled (or loaded) before the first request, not in it
            if self.model_id is None:
                self.model_id = default_model_id(engine)
            scheduler = Scheduler(engine, self.max_batch, self.max_queue, self.prefill_chunk, self.metrics,
                                  self.step_delay)
            scheduler.start()
            self.engine, self.scheduler = engine, scheduler
            self.metrics.ready.set(1)
        except Exception as exc:
            self.error = f"{exc}" if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            log.error("loading the model failed: %s", self.error)
        finally:
            self.loaded.set()


def default_model_id(engine):
    from pathlib import Path

    src = getattr(engine, "source", "") or ""
    p = Path(src)
    if p.name.startswith("step-") and p.parent.name == "checkpoints":
        return p.parent.parent.name or "nanochat"
    return (p.stem if p.suffix == ".gguf" else p.name) or "nanochat"


# --------------------------------------------------------------------- plumbing
def _json(status, body):
    return JSONResponse(body, status_code=status)


class _Metered:
    """Pure ASGI middleware counting answered requests by route and status (a pure one, so
    streaming and disconnect detection are untouched)."""

    KNOWN = {"/", "/favicon.ico", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in self.KNOWN else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.state.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


async def _read_json(request, limit):
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, "the Content-Length header is not an integer.") from None
        if n > limit:
            raise ApiError(413, f"request body is {n} bytes, more than the limit of {limit} bytes.",
                           code="request_too_large")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, f"request body is more than the limit of {limit} bytes.", code="request_too_large")
    return parse_body(bytes(buf), limit)


def _usage(prompt_tokens, choices):
    """The OpenAI ``usage`` object of a request's choices so far."""
    done = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}


async def _collect(queue, on_event, choices, watcher, scheduler, jobs):
    """Non-streaming: feed scheduler events to ``on_event`` until every choice has finished; a
    client that goes away (or an error) cancels what is left."""
    try:
        while any(c.finish is None for c in choices):
            on_event(await queue.get())
    finally:
        _release(watcher, scheduler, jobs, choices)


def _release(watcher, scheduler, jobs, choices):
    """A request is over (answered, failed or abandoned): stop watching the client and cancel
    the sequences still running, so their caches are freed at the next scheduler step."""
    watcher.cancel()
    scheduler.cancel([j for j, c in zip(jobs, choices) if c.finish is None])


async def _watch_disconnect(request, on_disconnect):
    """Wait for the client to go away, then call ``on_disconnect`` (cancels its sequences)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                on_disconnect()
                return
    except (asyncio.CancelledError, Exception):
        return


def _offsets(tokenizer, ids, start=0):
    """Character offset of each token's text in the decoded text of ``ids`` (plus ``start``)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, pos = [], start
    for t in ids:
        out.append(pos)
        pos += len(dec.decode(tokenizer.token_bytes(int(t))))
    return out


class _Choice:
    """What one choice has gathered so far."""

    def __init__(self, index):
        self.index = index
        self.text = []
        self.finish = None
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.tokens, self.logprobs, self.top, self.offsets = [], [], [], []
        self.started = False   # chat: leading spaces of the answer are dropped until text starts

    def chat_text(self, piece):
        if not self.started:
            piece = piece.lstrip(" ")
            self.started = bool(piece)
        return piece


# ---------------------------------------------------------------------- the app
def create_app(model, *, model_id=None, api_key=None, max_batch=8, max_queue=64, prefill_chunk=128,
               max_body_bytes=DEFAULT_MAX_BODY_BYTES, step_delay=0.0, on_loaded=None) -> FastAPI:
    """The server app. ``model``: an ``Engine``, or a callable returning one (called in a
    background thread at startup; ``/health`` answers 503 until it returns). ``on_loaded(state)``
    runs after loading ends, successfully or not (the CLI stops the server on a failure)."""
    from contextlib import asynccontextmanager

    state = ServerState(model_id, api_key, max_batch, max_queue, prefill_chunk, max_body_bytes, step_delay)

    def load():
        state.load(model)
        if on_loaded is not None:
            on_loaded(state)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load, name="nanochat-loader", daemon=True).start()
        try:
            yield
        finally:
            if state.scheduler is not None:
                await asyncio.to_thread(state.scheduler.stop)

    app = FastAPI(title="nanochat-ternary", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    app.add_middleware(_Metered, state=state)

    # -------------------------------------------------------------- errors
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return _json(exc.status, exc.body())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        message = {404: f"no route {request.method} {request.url.path}; see /v1/models, /v1/completions, "
                        "/v1/chat/completions, /health, /metrics.",
                   405: f"method {request.method} is not allowed on {request.url.path}."}.get(
            exc.status_code, str(exc.detail))
        return _json(exc.status_code, ApiError(exc.status_code, message).body())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return _json(422, ApiError(422, f"invalid request: {exc.errors()[:1]}").body())

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        log.exception("unhandled error")
        return _json(500, ApiError(500, f"internal error: {type(exc).__name__}: {exc}").body())

    def require(request: Request):
        if state.api_key:
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
                raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                               code="invalid_api_key")
        if state.error is not None:
            raise ApiError(503, f"the model failed to load: {state.error}", code="model_not_loaded")
        if not state.ready:
            raise ApiError(503, "the model is still loading; retry when GET /health answers 200.",
                           code="model_loading")

    def check_model(name):
        if name is not None and name != state.model_id:
            raise ApiError(404, f"the model '{name[:200]}' does not exist; this server serves '{state.model_id}'.",
                           param="model", code="model_not_found")

    def check_context(ids, max_tokens, default):
        ctx = state.engine.context_length
        if len(ids) > ctx:
            raise ApiError(400, f"the prompt is {len(ids)} tokens, more than the model's context of {ctx} tokens; "
                                "shorten it (prompts are refused, never truncated).",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            return min(default, ctx - len(ids))
        if len(ids) + max_tokens > ctx:
            raise ApiError(400, f"max_tokens {max_tokens} plus the prompt's {len(ids)} tokens is more than the "
                                f"model's context of {ctx} tokens; ask for at most {ctx - len(ids)}.",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    async def encode(text):
        tok = state.engine.tokenizer
        if not text:
            return [tok.eot_id]  # an empty prompt starts a new document
        return await asyncio.to_thread(tok.encode, text)

    def submit(request, prompts, sampling, stop, logprobs=None, prompt_logprobs=False):
        """Jobs for every (prompt, choice); returns them, their event queue and the watcher."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event):
            loop.call_soon_threadsafe(queue.put_nowait, event)

        jobs = []
        params = sampling.params
        for p, (ids, max_tokens) in enumerate(prompts):
            for c in range(sampling.n):
                seed = None if params.seed is None else params.seed + c
                jobs.append(Job(ids, max_tokens, replace(params, seed=seed), sink, tuple(stop),
                                stop_at_eot=not sampling.ignore_eos, logprobs=logprobs,
                                prompt_logprobs=prompt_logprobs, index=p * sampling.n + c))
        try:
            state.scheduler.submit(jobs)
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full") from None
        watcher = asyncio.create_task(_watch_disconnect(request, lambda: state.scheduler.cancel(jobs)))
        return jobs, queue, watcher

    # -------------------------------------------------------------- routes
    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(_page())

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    @app.get("/health")
    async def health():
        if state.error is not None:
            return _json(503, {"status": "error", "message": f"the model failed to load: {state.error}"})
        if not state.ready:
            return _json(503, {"status": "loading"})
        return {"status": "ok", "model": state.model_id, "active": state.scheduler.active_count,
                "waiting": state.scheduler.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card():
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "nanochat",
                "context_length": state.engine.context_length}

    @app.get("/v1/models")
    async def models(request: Request):
        require(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request):
        require(request)
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        require(request)
        body = await _read_json(request, state.max_body_bytes)
        req = parse_completion(body, min(state.engine.cfg.vocab_size, state.engine.tokenizer.vocab_size))
        check_model(req.model)
        tok = state.engine.tokenizer
        prompts, texts = [], []
        for p in req.prompts:
            ids = await encode(p) if isinstance(p, str) else p
            texts.append(p if isinstance(p, str) else tok.decode(ids))
            prompts.append((ids, check_context(ids, req.sampling.max_tokens, DEFAULT_COMPLETION_TOKENS)))
        prompt_logprobs = req.echo and req.logprobs is not None
        jobs, queue, watcher = submit(request, prompts, req.sampling, req.sampling.stop, req.logprobs, prompt_logprobs)
        n = req.sampling.n
        choices = [_Choice(i) for i in range(len(jobs))]
        for i, ch in enumerate(choices):
            ch.prompt_tokens = len(prompts[i // n][0])
            ch.prompt_text = texts[i // n]
            ch.echo_len = len(ch.prompt_text) if req.echo else 0
        usage_prompt = sum(len(ids) for ids, _ in prompts)
        cid, created = "cmpl-" + secrets.token_hex(12), int(time.time())

        def logprob_block(ch, start):
            if req.logprobs is None:
                return None
            return {"tokens": [token_text(tok, t) for t in ch.tokens[start:]], "token_logprobs": ch.logprobs[start:],
                    "top_logprobs": ch.top[start:], "text_offset": ch.offsets[start:]}

        def on_event(ev):
            """Apply ``ev`` to its choice; returns (choice, text piece, first new token index) or None."""
            ch = choices[ev.index]
            if isinstance(ev, ErrorEvent):
                raise ApiError(500, ev.message, code="generation_failed")
            if isinstance(ev, PromptLogprobsEvent):
                start = len(ch.tokens)
                ch.tokens += ev.token_ids
                ch.logprobs += ev.logprobs
                ch.top += [None if t is None else {token_text(tok, i): lp for i, lp in t} for t in ev.top]
                ch.offsets += _offsets(tok, ev.token_ids)
                return ch, "", start
            if isinstance(ev, TokenEvent):
                start = len(ch.tokens)
                if req.logprobs is not None:
                    ch.tokens.append(ev.token_id)
                    ch.logprobs.append(ev.logprob)
                    ch.top.append({token_text(tok, i): lp for i, lp in ev.top})
                    ch.offsets.append(ch.echo_len + sum(len(t) for t in ch.text))
                ch.text.append(ev.text)
                ch.completion_tokens += 1
                return ch, ev.text, start
            if isinstance(ev, DoneEvent):
                ch.text.append(ev.text)
                ch.finish = ev.finish_reason
                ch.completion_tokens = ev.completion_tokens
                return ch, ev.text, len(ch.tokens)
            return None

        def usage():
            return _usage(usage_prompt, choices)

        if not req.sampling.stream:
            await _collect(queue, on_event, choices, watcher, state.scheduler, jobs)
            return {"id": cid, "object": "text_completion", "created": created, "model": state.model_id,
                    "choices": [{"index": c.index, "text": (c.prompt_text if req.echo else "") + "".join(c.text),
                                 "logprobs": logprob_block(c, 0), "finish_reason": c.finish} for c in choices],
                    "usage": usage()}

        def chunk(choice_list, **extra):
            return _sse({"id": cid, "object": "text_completion", "created": created, "model": state.model_id,
                         "choices": choice_list, **extra})

        async def stream():
            try:
                if req.echo and not prompt_logprobs:
                    for ch in choices:
                        yield chunk([{"index": ch.index, "text": ch.prompt_text, "logprobs": None, "finish_reason": None}])
                while any(c.finish is None for c in choices):
                    ev = await queue.get()
                    try:
                        got = on_event(ev)
                    except ApiError as exc:
                        yield _sse(exc.body())
                        break
                    if got is None:
                        continue
                    ch, piece, start = got
                    if isinstance(ev, PromptLogprobsEvent):
                        piece = ch.prompt_text
                    if ch.finish == "cancelled":
                        continue
                    last = ch.finish is not None and all(c.finish is not None for c in choices)
                    if piece or ch.finish is not None or (req.logprobs is not None and start < len(ch.tokens)):
                        extra = {"usage": usage()} if last and not req.sampling.include_usage else {}
                        yield chunk([{"index": ch.index, "text": piece, "logprobs": logprob_block(ch, start),
                                      "finish_reason": ch.finish}], **extra)
                if req.sampling.include_usage:
                    yield chunk([], usage=usage())
                yield b"data: [DONE]\n\n"
            finally:
                _release(watcher, state.scheduler, jobs, choices)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=_SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        require(request)
        body = await _read_json(request, state.max_body_bytes)
        req = parse_chat(body)
        check_model(req.model)
        tok = state.engine.tokenizer
        text = render_chat(req.messages)
        ids = [tok.eot_id] + await asyncio.to_thread(tok.encode, text)
        max_tokens = check_context(ids, req.sampling.max_tokens, state.engine.context_length)
        stop = list(req.sampling.stop) + [s for s in CHAT_STOP if s not in req.sampling.stop]
        top_k = req.top_logprobs if req.logprobs else None
        jobs, queue, watcher = submit(request, [(ids, max_tokens)], req.sampling, stop, top_k)
        choices = [_Choice(i) for i in range(len(jobs))]
        cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())

        def lp_entry(ev):
            def one(i, lp):
                t = tok.token_bytes(int(i))
                return {"token": token_text(tok, i), "logprob": lp, "bytes": list(t)}
            entry = one(ev.token_id, ev.logprob)
            entry["top_logprobs"] = [one(i, lp) for i, lp in ev.top]
            return entry

        def on_event(ev):
            ch = choices[ev.index]
            if isinstance(ev, ErrorEvent):
                raise ApiError(500, ev.message, code="generation_failed")
            if isinstance(ev, TokenEvent):
                piece = ch.chat_text(ev.text)
                ch.text.append(piece)
                ch.completion_tokens += 1
                if req.logprobs:
                    ch.logprobs.append(lp_entry(ev))
                return ch, piece
            if isinstance(ev, DoneEvent):
                piece = ch.chat_text(ev.text)
                ch.text.append(piece)
                ch.finish = ev.finish_reason
                ch.completion_tokens = ev.completion_tokens
                return ch, piece
            return None

        def usage():
            return _usage(len(ids), choices)

        if not req.sampling.stream:
            await _collect(queue, on_event, choices, watcher, state.scheduler, jobs)
            return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_id,
                    "choices": [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                                 "logprobs": {"content": c.logprobs} if req.logprobs else None,
                                 "finish_reason": c.finish} for c in choices],
                    "usage": usage()}

        def chunk(choice_list, **extra):
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                         "choices": choice_list, **extra})

        async def stream():
            try:
                for ch in choices:
                    yield chunk([{"index": ch.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                while any(c.finish is None for c in choices):
                    ev = await queue.get()
                    n_lp = len(choices[ev.index].logprobs)
                    try:
                        got = on_event(ev)
                    except ApiError as exc:
                        yield _sse(exc.body())
                        break
                    if got is None:
                        continue
                    ch, piece = got
                    if ch.finish == "cancelled":
                        continue
                    lps = {"content": ch.logprobs[n_lp:]} if req.logprobs and len(ch.logprobs) > n_lp else None
                    if piece or lps:
                        yield chunk([{"index": ch.index, "delta": {"content": piece}, "logprobs": lps,
                                      "finish_reason": None}])
                    if ch.finish is not None:
                        last = all(c.finish is not None for c in choices)
                        extra = {"usage": usage()} if last and not req.sampling.include_usage else {}
                        yield chunk([{"index": ch.index, "delta": {}, "logprobs": None, "finish_reason": ch.finish}],
                                    **extra)
                if req.sampling.include_usage:
                    yield chunk([], usage=usage())
                yield b"data: [DONE]\n\n"
            finally:
                _release(watcher, state.scheduler, jobs, choices)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=_SSE_HEADERS)

    return app


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


_PAGE = None


def _page():
    global _PAGE
    if _PAGE is None:
        _PAGE = resources.files("nanochat.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return _PAGE
