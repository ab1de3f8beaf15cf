"""Byte-level BPE tokenizer: training, on-disk caching, encode/decode.

A thin wrapper around HuggingFace ``tokenizers``: a BPE model with the GPT-2 style
ByteLevel pre-tokenizer and decoder (every byte string is representable, so encoding
is lossless) and one special token, ``<|endoftext|>``, that separates documents.

The wrapper also exposes the raw vocabulary and merge list (``vocab_list``, ``merges``)
and the bytes behind each token (``token_bytes``) so that the GGUF exporter can embed
the tokenizer and evaluation can count true bytes for bits per byte.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

EOT = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096
# 256 byte symbols plus the end-of-text token: a vocabulary with no merges at all.
MIN_VOCAB_SIZE = 257
# The largest vocabulary anything here builds or reads (docs/limits.md): 2^20 is four times
# the largest vocabularies in use (~256k) and keeps a float32 embedding row table of width 4096
# at 16 GiB; the BPE trainer itself panics (a Rust abort) near 2^31.
MAX_VOCAB_SIZE = 1 << 20
# A tokenizer JSON of a 2^20 vocabulary with its merges is about 60 MB; refuse more before reading.
MAX_TOKENIZER_JSON_BYTES = 256 << 20
CACHE_ENV_VAR = "NANOCHAT_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/nanochat-ternary")


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: the argument, else $NANOCHAT_CACHE, else ~/.cache/nanochat-ternary."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


def check_vocab_size(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}.")
    if not MIN_VOCAB_SIZE <= int(vocab_size) <= MAX_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be between {MIN_VOCAB_SIZE} (256 bytes + end-of-text) and "
            f"{MAX_VOCAB_SIZE}, got {vocab_size}."
        )
    return int(vocab_size)


def _byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte <-> printable-character table used by the ByteLevel pre-tokenizer.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes map, in byte order,
    to code points 256, 257, ... so that every token is a printable string.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


def _atomic_write_text(path: Path, text: str) -> None:
    from nanochat.io.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _check_text(text) -> None:
    """ValueError unless ``text`` is a str that UTF-8 can encode (no lone surrogates: Python keeps the
    undecodable bytes of argv and of ``errors="surrogateescape"`` reads as those)."""
    if not isinstance(text, str):
        raise ValueError(f"the tokenizer encodes text (str), got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise ValueError(f"the text is not valid UTF-8 ({what} at character {exc.start}).") from None


class Tokenizer:
    """Byte-level BPE with an end-of-text token.

    ``encode`` treats the text ``<|endoftext|>`` as ordinary characters unless
    ``allow_special=True``, so a document that happens to contain that string cannot
    inject a document boundary. ``decode`` keeps special tokens by default, so
    ``decode(encode(s, allow_special=True)) == s`` for every string ``s``.
    """

    def __init__(self, hf_tokenizer):
        eot_id = hf_tokenizer.token_to_id(EOT)
        if eot_id is None:
            raise ValueError(f"tokenizer has no {EOT} token; it was not trained by nanochat.")
        # Fixed for the object's lifetime (toggling it per call would race across threads).
        hf_tokenizer.encode_special_tokens = True
        self._hf = hf_tokenizer
        self._eot_id = int(eot_id)
        self._vocab_list: list[str] | None = None
        self._byte_lengths: np.ndarray | None = None

    # -- construction -------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        length: int | None = None,
        progress: bool = False,
    ) -> "Tokenizer":
        """Train a byte-level BPE on ``texts`` (one string per document).

        The result may hold fewer than ``vocab_size`` tokens when the corpus runs out of
        pairs to merge; use ``Tokenizer.vocab_size`` for the model's embedding size.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        vocab_size = check_vocab_size(vocab_size)
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        hf.train_from_iterator(texts, trainer, length=length)
        return cls(hf)

    @classmethod
    def from_json_str(cls, text: str, source: str = "tokenizer JSON") -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        if not isinstance(text, str):
            raise ValueError(f"{source} is not a valid tokenizer: expected JSON text, got {type(text).__name__}.")
        if len(text) > MAX_TOKENIZER_JSON_BYTES:
            raise ValueError(f"{source} is {len(text):,} characters, more than the {MAX_TOKENIZER_JSON_BYTES:,} "
                             "a tokenizer may have.")
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as exc:  # the Rust side raises a bare Exception
            reason = " ".join(str(exc).split())
            raise ValueError(f"{source} is not a valid tokenizer: {reason}.") from None
        except BaseException as exc:  # a Rust panic (PanicException derives from BaseException)
            if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            raise ValueError(f"{source} is not a valid tokenizer (the tokenizers library panicked: "
                             f"{type(exc).__name__}).") from None
        if hf.get_vocab_size(with_added_tokens=True) > MAX_VOCAB_SIZE:
            raise ValueError(f"{source} holds {hf.get_vocab_size(with_added_tokens=True):,} tokens, more than "
                             f"the limit of {MAX_VOCAB_SIZE:,}.")
        try:
            return cls(hf)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        from nanochat.io.atomic import read_regular

        path = Path(path)
        data = read_regular(path, MAX_TOKENIZER_JSON_BYTES, what="tokenizer file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"tokenizer file {path} is not UTF-8 JSON.") from None
        return cls.from_json_str(text, source=f"tokenizer file {path}")

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer JSON atomically (temporary file, then rename)."""
        _atomic_write_text(Path(path), self.to_json_str())

    def to_json_str(self) -> str:
        """The HuggingFace tokenizer JSON (what ``from_json_str`` reads back)."""
        return self._hf.to_str()

    # -- encode / decode -----------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        _check_text(text)
        if not allow_special or EOT not in text:
            return self._hf.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for i, piece in enumerate(text.split(EOT)):
            if i:
                ids.append(self._eot_id)
            if piece:
                ids.extend(self._hf.encode(piece, add_special_tokens=False).ids)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in the Rust library); special text is plain."""
        for text in texts:
            _check_text(text)
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {n}).")
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    # -- vocabulary ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._eot_id

    @property
    def vocab_list(self) -> list[str]:
        """Token strings in id order (byte-level alphabet: bytes shown as printable chars)."""
        if self._vocab_list is None:
            tokens = [""] * self.vocab_size
            for token, i in self._hf.get_vocab(with_added_tokens=True).items():
                tokens[i] = token
            self._vocab_list = tokens
        return list(self._vocab_list)

    @property
    def merges(self) -> list[tuple[str, str]]:
        """BPE merges in priority order, as pairs of token strings."""
        raw = json.loads(self._hf.to_str())["model"]["merges"]
        # Older library versions store "a b" strings, newer ones [a, b] pairs.
        return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in raw]

    def merge_strings(self) -> list[str]:
        """Merges as "a b" strings (the GGUF / llama.cpp form; tokens never hold a space)."""
        return [f"{a} {b}" for a, b in self.merges]

    def is_special(self, token_id: int) -> bool:
        return int(token_id) == self._eot_id

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for; empty for the end-of-text token."""
        if self.is_special(token_id):
            return b""
        token = self._hf.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size}).")
        return bytes(_UNICODE_TO_BYTE[c] for c in token)

    def token_byte_lengths(self) -> np.ndarray:
        """int64 [vocab_size]: bytes per token (0 for end-of-text), for bits-per-byte."""
        if self._byte_lengths is None:
            self._byte_lengths = np.array(
                [len(self.token_bytes(i)) for i in range(self.vocab_size)], dtype=np.int64
            )
        return self._byte_lengths.copy()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def load_or_train(
    path: str | os.PathLike,
    texts: Callable[[], Iterable[str]],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    length: int | None = None,
    progress: bool = False,
) -> tuple[Tokenizer, bool]:
    """Load the tokenizer cached at ``path``, or train one on ``texts()`` and save it there.

    Returns ``(tokenizer, trained)``. ``texts`` is called only when training is needed.
    The caller names ``path`` by corpus fingerprint and vocab size, so a file present
    there is the right one.
    """
    path = Path(path)
    if path.is_file():
        try:
            return Tokenizer.load(path), False
        except ValueError:
            pass  # a damaged cache entry is rebuilt, not reported
    tokenizer = Tokenizer.train(texts(), vocab_size, length=length, progress=progress)
    tokenizer.save(path)
    return tokenizer, True
