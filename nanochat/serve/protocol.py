"""The OpenAI wire format: request validation, the chat template and error bodies.

Every problem with a request is an ``ApiError`` with one clear message and the status OpenAI
clients expect: 400 (malformed JSON, non-UTF-8 body, a prompt or ``max_tokens`` beyond the
context), 401 (API key), 404 (unknown model or route), 413 (body over the size limit), 422
(a field of the wrong type or an invalid value), 429 (queue full). The body is
``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from nanochat.infer.sampling import SamplingParams

MAX_N = 16                 # choices per request
MAX_STOP = 16              # stop strings per request (OpenAI allows 4; more do no harm here)
MAX_STOP_CHARS = 256       # characters per stop string
MAX_LOGPROBS = 20          # alternatives per token (completions' ``logprobs``, chat's ``top_logprobs``)
MAX_PROMPTS = 64           # prompts in one completions request (a list of prompts)
MAX_MESSAGES = 1024        # messages in one chat request
MAX_TEMPERATURE = 2.0      # OpenAI's range is [0, 2]
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions

# The chat template for these base models (docs/serve.md): the end-of-text token (a document
# boundary), then one line per message, then the assistant's cue. The model continues after
# "Assistant:"; a new turn marker in its output ends the answer.
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ("\nUser:", "\nSystem:", "\nAssistant:")


class ApiError(Exception):
    """An error answered as an OpenAI-style JSON body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = int(status), str(message), param, code

    def body(self):
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------- the body
def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes, limit: int):
    """The JSON object in ``raw`` (bytes of a request body of at most ``limit`` bytes)."""
    if len(raw) > limit:
        raise ApiError(413, f"request body is {len(raw)} bytes, more than the limit of {limit} bytes.",
                       code="request_too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start}).",
                       code="invalid_encoding") from None
    if not text.strip():
        raise ApiError(400, "request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}.",
                       code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply.", code="invalid_json") from None
    except ValueError as exc:  # NaN/Infinity, integers past Python's digit limit
        raise ApiError(400, f"request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"request body must be a JSON object, got {_json_type(body)}.", code="invalid_type")
    return body


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _bad(param, message):
    return ApiError(422, f"'{param}': {message}", param=param, code="invalid_value")


def _check_unicode(text, param):
    """JSON may carry lone surrogates (\\ud800), which are not text; refuse them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"'{param}' is not valid Unicode text (lone surrogate U+{ord(text[exc.start]):04X} at "
                            f"character {exc.start}).", param=param, code="invalid_encoding") from None
    return text


def _int(body, key, default, lo=None, hi=None, nullable=True):
    v = body.get(key, default)
    if v is None and nullable:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _bad(key, f"expected an integer, got {_json_type(v)}.")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        where = f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
        raise _bad(key, f"must be an integer {where}, got {v}.")
    return v


def _num(body, key, default, lo, hi, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(key, f"expected a number, got {_json_type(v)}.")
    v = float(v)
    if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
        raise _bad(key, f"must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v:g}.")
    return v


def _bool(body, key, default=False):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(key, f"expected true or false, got {_json_type(v)}.")
    return v


def _stop(body):
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _bad("stop", "expected a string or an array of strings.")
    if len(v) > MAX_STOP:
        raise _bad("stop", f"at most {MAX_STOP} stop strings, got {len(v)}.")
    for s in v:
        if not s:
            raise _bad("stop", "stop strings must not be empty.")
        if len(s) > MAX_STOP_CHARS:
            raise _bad("stop", f"a stop string may have at most {MAX_STOP_CHARS} characters, got {len(s)}.")
        _check_unicode(s, "stop")
    return list(v)


def _unsupported(body):
    for key in ("frequency_penalty", "presence_penalty"):
        v = body.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _bad(key, f"expected a number, got {_json_type(v)}.")
            if v != 0:
                raise _bad(key, "is not supported by this server (use the extra 'repetition_penalty'); send 0 or omit it.")
    if body.get("logit_bias") not in (None, {}):
        raise _bad("logit_bias", "is not supported by this server; omit it.")
    if body.get("suffix") not in (None, ""):
        raise _bad("suffix", "is not supported by this server (no fill-in-the-middle); omit it.")
    tools = body.get("tools")
    if tools not in (None, []):
        raise _bad("tools", "tool calls are not supported by this server; omit 'tools'.")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("response_format", "only {\"type\": \"text\"} is supported.")


@dataclass
class Sampling:
    """The fields every generation request shares."""

    params: SamplingParams
    max_tokens: int | None     # None: the endpoint's default
    stop: list
    n: int
    stream: bool
    include_usage: bool
    ignore_eos: bool


def _sampling(body):
    temperature = _num(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _int(body, "top_k", 0, lo=0)
    if top_p == 0.0:  # the limit of top-p: only the most likely token
        top_p, top_k = 1.0, 1
    penalty = _num(body, "repetition_penalty", 1.0, 0.0, 100.0, lo_open=True)
    seed = _int(body, "seed", None, lo=0, hi=2**63 - 1)
    max_tokens = body.get("max_completion_tokens")
    key = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    max_tokens = _int(body, key, None, lo=0)
    n = _int(body, "n", 1, lo=1, hi=MAX_N)
    best_of = _int(body, "best_of", None, lo=1, hi=MAX_N)
    if best_of is not None and best_of != n:
        raise _bad("best_of", f"only best_of = n is supported (n = {n}), got {best_of}.")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options", f"expected an object, got {_json_type(options)}.")
        if not stream:
            raise _bad("stream_options", "is only allowed when 'stream' is true.")
        include_usage = _bool(options, "include_usage")
    _unsupported(body)
    return Sampling(SamplingParams(temperature, top_k, top_p, penalty, seed), max_tokens, _stop(body), n, stream,
                    include_usage, _bool(body, "ignore_eos"))


# ------------------------------------------------------------------------ requests
@dataclass
class CompletionRequest:
    prompts: list            # one entry per prompt: a str, or a list of token ids
    sampling: Sampling
    logprobs: int | None     # alternatives per token (None: no logprobs)
    echo: bool
    model: str | None


@dataclass
class ChatRequest:
    messages: list = field(default_factory=list)   # [(role, content)]
    sampling: Sampling | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    model: str | None = None


def _model(body):
    v = body.get("model")
    if v is not None and not isinstance(v, str):
        raise _bad("model", f"expected a string, got {_json_type(v)}.")
    return v


def _token_list(v, vocab_size, param):
    for t in v:
        if isinstance(t, bool) or not isinstance(t, int):
            raise _bad(param, f"a token list must hold integers, got {_json_type(t)}.")
        if not 0 <= t < vocab_size:
            raise _bad(param, f"token id {t} is outside the vocabulary [0, {vocab_size}).")
    return list(v)


def parse_completion(body, vocab_size) -> CompletionRequest:
    if "prompt" not in body:
        raise _bad("prompt", "is required (a string, an array of strings, an array of token ids, or an array of those).")
    p = body["prompt"]
    if isinstance(p, str):
        prompts = [_check_unicode(p, "prompt")]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        prompts = [_token_list(p, vocab_size, "prompt")]
    elif isinstance(p, list) and p:
        if len(p) > MAX_PROMPTS:
            raise _bad("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(p)}.")
        prompts = []
        for item in p:
            if isinstance(item, str):
                prompts.append(_check_unicode(item, "prompt"))
            elif isinstance(item, list) and item:
                prompts.append(_token_list(item, vocab_size, "prompt"))
            else:
                raise _bad("prompt", "an array of prompts must hold strings or non-empty arrays of token ids, "
                                     f"got {_json_type(item) if item != [] else 'an empty array'}.")
    else:
        raise _bad("prompt", "expected a string, an array of strings, a non-empty array of token ids, or an array "
                             f"of those, got {_json_type(p) if p != [] else 'an empty array'}.")
    sampling = _sampling(body)
    logprobs = _int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)
    return CompletionRequest(prompts, sampling, logprobs, _bool(body, "echo"), _model(body))


def parse_chat(body) -> ChatRequest:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "is required: a non-empty array of {\"role\", \"content\"} objects.")
    if len(msgs) > MAX_MESSAGES:
        raise _bad("messages", f"at most {MAX_MESSAGES} messages, got {len(msgs)}.")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"expected an object with 'role' and 'content', got {_json_type(m)}.")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {json.dumps(role)[:40]}.")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):  # content parts: only text
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _bad(f"{where}.content", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported.")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content", f"expected a string or an array of text parts, got {_json_type(content)}.")
        out.append((role, _check_unicode(content, f"{where}.content")))
    sampling = _sampling(body)
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise _bad("top_logprobs", "requires 'logprobs': true.")
    return ChatRequest(out, sampling, logprobs, top or 0, _model(body))


def render_chat(messages) -> str:
    """The chat template: one ``Role: content`` line per message, then ``Assistant:``.

    >>> render_chat([("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")])
    'System: Be brief.\\nUser: Hi\\nAssistant: Hello.\\nUser: Bye\\nAssistant:'

    The server prepends the end-of-text token and stops the answer at any of ``CHAT_STOP``.
    """
    return "".join(f"{CHAT_ROLES[role]}: {content}\n" for role, content in messages) + "Assistant:"


def token_text(tokenizer, token_id) -> str:
    """A token as text for logprobs: its UTF-8 text, ``bytes:\\xNN..`` when its bytes are not
    whole characters (OpenAI's convention), the end-of-text token by name."""
    if token_id == tokenizer.eot_id:
        return "<|endoftext|>"
    b = tokenizer.token_bytes(int(token_id))
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in b)
