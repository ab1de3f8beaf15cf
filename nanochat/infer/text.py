"""Text out of token ids: incremental UTF-8 decoding with stop strings, and generation stats."""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Callable, Sequence


class TextStream:
    """Token ids in, safe-to-show text out.

    Bytes of byte-level tokens are decoded incrementally, so a UTF-8 character split across
    tokens comes out whole once its last byte arrives (invalid bytes become U+FFFD). Text that
    could be the start of a stop string is held back until it is known not to be; when a stop
    string appears, the text before it is released, the stop string and everything after it
    are dropped and ``stopped`` turns True.
    """

    def __init__(self, token_bytes: Callable[[int], bytes], stop: Sequence[str] = ()):
        stop = [s for s in stop]
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}.")
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._pending = ""
        self.stopped = False
        self.text = ""

    def push(self, token_id) -> str:
        """Feed one token; returns the text that became safe to show (may be empty)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(self._token_bytes(int(token_id)))
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: flush the decoder and release what is left."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final):
        cut = -1
        for s in self._stop:
            i = self._pending.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            out, self._pending, self.stopped = self._pending[:cut], "", True
        elif final:
            out, self._pending = self._pending, ""
        else:
            hold = self._held_suffix()
            out = self._pending[: len(self._pending) - hold]
            self._pending = self._pending[len(self._pending) - hold:]
        self.text += out
        return out

    def _held_suffix(self):
        """Length of the longest suffix of the pending text that begins some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:n]):
                    best = n
                    break
        return best


@dataclass
class GenerationStats:
    """Counts and timings of the last generation. Decode speed counts the tokens sampled
    after the prompt over the time from the end of the prefill to the last token."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose cache entries were kept from the previous call
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "length", "stop_token", "stop_string"
    drafted: int = 0    # speculative decoding: tokens the MTP heads proposed
    accepted: int = 0   # ... and how many of them the model accepted

    @property
    def acceptance_rate(self):
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def prefill_tokens_per_sec(self):
        n = self.prompt_tokens - self.reused_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_sec(self):
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def summary(self):
        return (f"{self.new_tokens} tokens in {self.decode_seconds:.2f} s ({self.decode_tokens_per_sec:.1f} tokens/s); "
                f"prompt {self.prompt_tokens} tokens in {self.prefill_seconds:.2f} s "
                f"({self.prefill_tokens_per_sec:.1f} tokens/s, {self.reused_tokens} reused from the cache); "
                f"finished by {self.finish_reason or 'length'}"
                + (f"; speculative: {self.accepted}/{self.drafted} drafts accepted ({self.acceptance_rate:.0%})"
                   if self.drafted else ""))


@dataclass
class Completion:
    text: str
    token_ids: list = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
