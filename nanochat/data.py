"""The training corpus: discovery, train/val split, tokenization into cached token shards.

``prepare_data()`` is the one entry point. It returns a ``Dataset`` whose token arrays
are read-only ``numpy.memmap`` views of the cached shards (``train.bin``, ``val.bin``).

Sources (see docs/data.md for the rules):
- default: the ``.py`` files of the running Python's standard library (no test suites);
- a directory of text files, split like the standard library by path hash;
- a single text file, split at the first line end after 99% of its characters;
- a pre-tokenized ``.bin`` of raw little-endian token ids (optional JSON sidecar),
  whose last 1% of tokens is the validation split.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from nanochat.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    Tokenizer,
    check_vocab_size,
    load_or_train,
    resolve_cache_dir,
)

FORMAT_VERSION = 1
VAL_FRACTION = 0.01

# Files a directory corpus picks up; anything else (binaries, images, ...) is ignored.
TEXT_EXTENSIONS = frozenset(
    ".txt .md .rst .py .pyi .c .h .cc .cpp .hpp .rs .go .js .ts .java .html .css .json "
    ".jsonl .toml .yaml .yml .csv .tex .sh .ini .cfg .xml".split()
)
# Standard-library directories left out of the default corpus: test suites are large and
# full of odd fixtures (deliberately broken encodings, huge literals); the others are
# third-party packages, caches and compiled extensions.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
)
# Build-specific generated module (compiler flags of this interpreter build), not code.
STDLIB_EXCLUDED_PREFIXES = ("_sysconfigdata",)

# Above this many bytes of training text the tokenizer trains on a path-hash subset.
TOKENIZER_TRAIN_MAX_BYTES = 64 << 20
# A single text file is encoded in pieces of about this size, cut at line ends.
TEXT_CHUNK_BYTES = 1 << 20
# Documents go to the batch encoder in groups of about this many bytes.
ENCODE_BATCH_BYTES = 8 << 20

SIDECAR_KEYS = ("vocab_size", "tokenizer", "dtype", "eot_id")
BIN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


# ------------------------------------------------------------------------------------
# Corpus discovery and the train/val split
# ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    """One unit of text: a name, its size on disk (for progress) and a reader.

    ``read()`` returns the text, or None when the bytes are not valid UTF-8. An
    end-of-text token follows the document in the token stream when ``ends_document``.
    """

    name: str
    nbytes: int
    read: Callable[[], "str | None"]
    ends_document: bool = True


def path_hash_fraction(name: str) -> float:
    """A stable number in [0, 1) from a relative path (sha1 of its UTF-8 bytes)."""
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_names(names: Sequence[str], fraction: float = VAL_FRACTION) -> tuple[list[str], list[str]]:
    """Split names into (train, val) by path hash, keeping the given order in each part.

    A name is validation when its hash fraction is below ``fraction``. When that picks
    none, the name with the smallest hash is validation; when it picks all, the one with
    the largest hash goes back to training. Needs at least two names.
    """
    if len(names) < 2:
        raise ValueError(f"a path-hash split needs at least 2 documents, got {len(names)}.")
    h = {n: path_hash_fraction(n) for n in names}
    val = {n for n in names if h[n] < fraction}
    if not val:
        val = {min(names, key=h.__getitem__)}
    if len(val) == len(names):
        val.discard(max(names, key=h.__getitem__))
    return [n for n in names if n not in val], [n for n in names if n in val]


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def _file_document(root: Path, name: str) -> Document:
    path = root / name
    return Document(name=name, nbytes=path.stat().st_size, read=lambda: _read_utf8(path))


def _chunk_at_lines(text: str, target: int = TEXT_CHUNK_BYTES) -> list[str]:
    """Cut ``text`` into pieces of about ``target`` characters, each ending at a line end."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + target)
        end = len(text) if cut < 0 else cut + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _text_documents(name: str, text: str) -> list[Document]:
    """One document held in memory, cut into pieces; only the last piece ends it."""
    pieces = _chunk_at_lines(text)
    return [
        Document(
            name=f"{name}#{i}",
            nbytes=len(piece.encode("utf-8")),
            read=lambda piece=piece: piece,
            ends_document=(i == len(pieces) - 1),
        )
        for i, piece in enumerate(pieces)
    ]


def split_text(text: str, fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """(train, val) for one text: val starts after the first line end at or past 99%.

    Without such a line end the cut is at 99% of the characters. Both parts are
    non-empty; the text needs at least 2 characters.
    """
    if len(text) < 2:
        raise ValueError(f"text of {len(text)} characters is too short to split into train and val.")
    mark = int(len(text) * (1.0 - fraction))
    newline = text.find("\n", mark)
    cut = newline + 1 if 0 <= newline < len(text) - 1 else mark
    cut = min(max(cut, 1), len(text) - 1)
    return text[:cut], text[cut:]


@dataclass
class Corpus:
    """A set of source files found on disk, before anything is read.

    ``kind`` is "stdlib", "dir" or "file"; ``names`` are POSIX paths relative to
    ``root`` in sorted order (for "file", root is the file's folder). ``fingerprint``
    hashes the kind, root and each file's name, size and modification time: it names
    the cache entry without reading the files.
    """

    kind: str
    root: Path
    names: list[str]
    fingerprint: str

    def split(self, fraction: float = VAL_FRACTION) -> tuple[list[Document], list[Document]]:
        """(train documents, val documents); see docs/data.md for the rules."""
        if len(self.names) == 1:
            path = self.root / self.names[0]
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}).") from None
            if not text:
                raise ValueError(f"{path} is empty.")
            train, val = split_text(text, fraction)
            return _text_documents(self.names[0] + ":train", train), _text_documents(
                self.names[0] + ":val", val
            )
        train, val = split_names(self.names, fraction)
        return [_file_document(self.root, n) for n in train], [_file_document(self.root, n) for n in val]


def _walk_files(root: Path, keep_dir: Callable[[str], bool], keep_file: Callable[[str], bool]) -> list[str]:
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if keep_dir(d))
        rel = Path(dirpath).relative_to(root)
        for f in filenames:
            if keep_file(f) and (Path(dirpath) / f).is_file():
                names.append((rel / f).as_posix())
    return sorted(names)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _fingerprint(kind: str, root: Path, names: Sequence[str]) -> str:
    entries = []
    for n in names:
        st = (root / n).stat()
        entries.append([n, st.st_size, st.st_mtime_ns])
    blob = json.dumps([FORMAT_VERSION, kind, str(root.resolve()), entries], separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def discover_corpus(data_path: str | os.PathLike | None = None) -> Corpus:
    """Find the files of a text corpus (the standard library when ``data_path`` is None)."""
    if data_path is None:
        root = stdlib_root()
        names = _walk_files(
            root,
            keep_dir=lambda d: d not in STDLIB_EXCLUDED_DIRS and not d.startswith((".", "config-")),
            keep_file=lambda f: f.endswith(".py") and not f.startswith(STDLIB_EXCLUDED_PREFIXES),
        )
        if not names:
            raise ValueError(f"the standard library folder {root} holds no .py files; pass --data PATH.")
        return Corpus("stdlib", root, names, _fingerprint("stdlib", root, names))

    path = Path(data_path).expanduser()
    if not path.exists():
        raise ValueError(f"data path {path} does not exist.")
    if path.is_dir():
        names = _walk_files(
            path,
            keep_dir=lambda d: not d.startswith(".") and d != "__pycache__",
            keep_file=lambda f: not f.startswith(".") and Path(f).suffix.lower() in TEXT_EXTENSIONS,
        )
        if not names:
            raise ValueError(
                f"directory {path} contains no text files (looked for {', '.join(sorted(TEXT_EXTENSIONS))})."
            )
        return Corpus("dir", path, names, _fingerprint("dir", path, names))
    if path.is_file():
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty.")
        root = path.parent
        return Corpus("file", root, [path.name], _fingerprint("file", root, [path.name]))
    raise ValueError(f"data path {path} is neither a file nor a directory.")


# ------------------------------------------------------------------------------------
# Token shards
# ------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """Tokens ready for the loaders.

    ``train_tokens`` / ``val_tokens`` are 1-D read-only memmaps (uint16, or uint32 for
    vocabularies above 65536). ``tokenizer`` is None only for a ``.bin`` without one.
    ``meta`` holds vocab size, token and raw byte counts per split (for bits per byte),
    document counts, skipped files and timings; see docs/data.md.
    """

    tokenizer: Tokenizer | None
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    meta: dict = field(default_factory=dict)
    tokenizer_path: Path | None = None  # the tokenizer JSON on disk (for checkpoints)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eot_id(self) -> int | None:
        return self.meta.get("eot_id")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


@dataclass
class _ShardStats:
    tokens: int = 0
    bytes: int = 0
    documents: int = 0
    skipped: list = field(default_factory=list)


def _document_batches(docs: Sequence[Document], max_bytes: int) -> Iterable[list[Document]]:
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += d.nbytes
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_shard(
    path: Path, docs: Sequence[Document], tokenizer: Tokenizer, dtype: np.dtype, progress: bool, desc: str
) -> _ShardStats:
    """Encode ``docs`` into ``path`` (temporary file, then rename); EOT after each document."""
    from tqdm.auto import tqdm

    stats = _ShardStats()
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, tqdm(
            total=sum(d.nbytes for d in docs), unit="B", unit_scale=True, desc=desc, disable=not progress
        ) as bar:
            for batch in _document_batches(docs, ENCODE_BATCH_BYTES):
                kept, texts = [], []
                for d in batch:
                    text = d.read()
                    if text is None:
                        stats.skipped.append(d.name)
                    else:
                        kept.append(d)
                        texts.append(text)
                for d, text, ids in zip(kept, texts, tokenizer.encode_batch(texts)):
                    arr = np.asarray(ids, dtype=dtype)
                    f.write(arr.tobytes())
                    stats.tokens += arr.size
                    stats.bytes += len(text.encode("utf-8"))
                    if d.ends_document:
                        f.write(eot.tobytes())
                        stats.tokens += 1
                        stats.documents += 1
                bar.update(sum(d.nbytes for d in batch))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cache files are plain readable data
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return stats


def _tokenizer_subset(docs: Sequence[Document], max_bytes: int | None = TOKENIZER_TRAIN_MAX_BYTES) -> list[Document]:
    """All training documents, or when they exceed ``max_bytes`` (None: no cap) the ones
    with the smallest path hashes up to that budget (kept in corpus order)."""
    if max_bytes is None or sum(d.nbytes for d in docs) <= max_bytes:
        return list(docs)
    chosen, total = set(), 0
    for d in sorted(docs, key=lambda d: path_hash_fraction(d.name)):
        if total >= max_bytes:
            break
        chosen.add(d.name)
        total += d.nbytes
    return [d for d in docs if d.name in chosen]


def _open_tokens(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _cached_dataset(entry: Path, settings: dict) -> Dataset | None:
    """The dataset in cache folder ``entry`` when it is complete and matches, else None."""
    meta = _read_json(entry / "meta.json")
    if not meta or meta.get("format_version") != FORMAT_VERSION:
        return None
    if any(meta.get(key) != value for key, value in settings.items()):
        return None
    try:
        dtype = np.dtype(meta["dtype"])
        counts = {s: int(meta[f"{s}_tokens"]) for s in ("train", "val")}
        for split, n in counts.items():
            if n < 1 or (entry / f"{split}.bin").stat().st_size != n * dtype.itemsize:
                return None
        tokenizer = Tokenizer.load(entry / "tokenizer.json")
    except (KeyError, TypeError, ValueError, OSError):
        return None
    return Dataset(
        tokenizer=tokenizer,
        train_tokens=_open_tokens(entry / "train.bin", dtype, counts["train"]),
        val_tokens=_open_tokens(entry / "val.bin", dtype, counts["val"]),
        meta=meta,
        tokenizer_path=entry / "tokenizer.json",
    )


def _build_settings(corpus: Corpus, vocab_size: int, val_fraction: float, tokenizer_max_bytes: int | None) -> dict:
    """Everything a cache entry's contents depend on (also checked against its meta.json)."""
    return {
        "fingerprint": corpus.fingerprint,
        "requested_vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "tokenizer_train_max_bytes": tokenizer_max_bytes,
    }


def cache_entry(settings: dict, kind: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: <cache>/data/<kind>-<16 hex digits of the settings>-v<vocab>."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return resolve_cache_dir(cache_dir) / "data" / f"{kind}-{key}-v{settings['requested_vocab_size']}"


def _check_val_fraction(val_fraction) -> float:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be a number in (0, 0.5], got {val_fraction!r}.")
    return float(val_fraction)


def _tokenizer_budget(tokenizer_train_bytes) -> int | None:
    """None -> the default cap; 0 -> no cap (None); n > 0 -> n bytes."""
    if tokenizer_train_bytes is None:
        return TOKENIZER_TRAIN_MAX_BYTES
    if isinstance(tokenizer_train_bytes, bool) or not isinstance(tokenizer_train_bytes, (int, np.integer)) \
            or tokenizer_train_bytes < 0:
        raise ValueError(f"tokenizer_train_bytes must be an integer >= 0, got {tokenizer_train_bytes!r}.")
    return int(tokenizer_train_bytes) or None


def prepare_data(
    data_path: str | os.PathLike | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    val_fraction: float = VAL_FRACTION,
    tokenizer_train_bytes: int | None = None,
) -> Dataset:
    """Tokenizer and train/val token shards for a corpus, built once and cached.

    ``data_path``: None (the standard library), a directory, a text file or a ``.bin``
    of token ids. ``vocab_size``: BPE size to train (for a ``.bin`` without a sidecar
    JSON: the declared vocab size). ``cache_dir``: cache root (default
    $NANOCHAT_CACHE or ~/.cache/nanochat-ternary). ``val_fraction``: share held out
    for validation (0.01). ``tokenizer_train_bytes``: cap on the text the tokenizer
    trains on (None: 64 MiB; 0: no cap). Bad input raises ValueError.
    """
    val_fraction = _check_val_fraction(val_fraction)
    if data_path is not None and Path(data_path).suffix.lower() == ".bin" and not Path(data_path).is_dir():
        return load_token_file(data_path, vocab_size, val_fraction)
    vocab_size = check_vocab_size(vocab_size)
    tokenizer_max_bytes = _tokenizer_budget(tokenizer_train_bytes)

    corpus = discover_corpus(data_path)
    settings = _build_settings(corpus, vocab_size, val_fraction, tokenizer_max_bytes)
    entry = cache_entry(settings, corpus.kind, cache_dir)
    cached = _cached_dataset(entry, settings)
    if cached is not None:
        return cached

    entry.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs = corpus.split(val_fraction)
    subset = _tokenizer_subset(train_docs, tokenizer_max_bytes)

    def training_texts():
        for d in subset:
            text = d.read()
            if text is not None:
                yield text

    t0 = time.perf_counter()
    tokenizer, trained = load_or_train(
        entry / "tokenizer.json", training_texts, vocab_size, length=len(subset), progress=progress
    )
    t1 = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    train = _write_shard(entry / "train.bin", train_docs, tokenizer, dtype, progress, "tokenize train")
    val = _write_shard(entry / "val.bin", val_docs, tokenizer, dtype, progress, "tokenize val")
    t2 = time.perf_counter()
    skipped = sorted(train.skipped + val.skipped)
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} file(s) of {corpus.root} that are not UTF-8: {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else ""),
            stacklevel=2,
        )
    if val.documents == 0:
        raise ValueError(f"no validation file of {corpus.root} is UTF-8 text, so there is no validation split.")
    if train.documents == 0:
        raise ValueError(f"no training file of {corpus.root} is UTF-8 text.")
    source_path = corpus.root / corpus.names[0] if corpus.kind == "file" else corpus.root
    meta = {
        "format_version": FORMAT_VERSION,
        "source": {"kind": corpus.kind, "path": str(source_path)},
        **settings,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.str,
        "train_tokens": train.tokens,
        "val_tokens": val.tokens,
        "train_bytes": train.bytes,
        "val_bytes": val.bytes,
        "train_documents": train.documents,
        "val_documents": val.documents,
        "val_names": [d.name for d in val_docs] if corpus.kind != "file" else [],
        "skipped_files": skipped,
        "tokenizer_trained_here": trained,
        "tokenizer_train_files": len(subset),
        "tokenizer_train_bytes": sum(d.nbytes for d in subset),
        "tokenizer_train_seconds": round(t1 - t0, 3),
        "tokenize_seconds": round(t2 - t1, 3),
    }
    _write_json(entry / "meta.json", meta)  # written last: its presence marks a complete entry
    return Dataset(
        tokenizer=tokenizer,
        train_tokens=_open_tokens(entry / "train.bin", dtype, train.tokens),
        val_tokens=_open_tokens(entry / "val.bin", dtype, val.tokens),
        meta=meta,
        tokenizer_path=entry / "tokenizer.json",
    )


# ------------------------------------------------------------------------------------
# Pre-tokenized .bin files
# ------------------------------------------------------------------------------------
def _read_sidecar(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"sidecar {path} is not UTF-8 JSON.") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"sidecar {path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if not isinstance(value, dict):
        raise ValueError(f"sidecar {path} must hold a JSON object, not {type(value).__name__}.")
    for key in value:
        if key not in SIDECAR_KEYS:
            raise ValueError(f"sidecar {path} has unknown field {key!r} (known: {', '.join(SIDECAR_KEYS)}).")
    for key in ("vocab_size", "eot_id"):
        v = value.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"sidecar {path} field {key!r} must be a non-negative integer, got {v!r}.")
    if "dtype" in value and value["dtype"] not in BIN_DTYPES:
        raise ValueError(
            f"sidecar {path} field 'dtype' must be one of {', '.join(BIN_DTYPES)}, got {value['dtype']!r}."
        )
    if "tokenizer" in value and not isinstance(value["tokenizer"], str):
        raise ValueError(
            f"sidecar {path} field 'tokenizer' must be a path string, got {value['tokenizer']!r}."
        )
    return value


def _first_index_at_least(tokens: np.ndarray, limit: int, chunk: int = 1 << 24) -> int:
    for start in range(0, tokens.size, chunk):
        hits = np.flatnonzero(tokens[start : start + chunk] >= limit)
        if hits.size:
            return start + int(hits[0])
    return -1


def _byte_count(tokens: np.ndarray, lengths: np.ndarray, chunk: int = 1 << 24) -> int:
    return int(sum(lengths[tokens[s : s + chunk]].sum() for s in range(0, tokens.size, chunk)))


def load_token_file(
    path: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB_SIZE, val_fraction: float = VAL_FRACTION
) -> Dataset:
    """A ``.bin`` of raw little-endian token ids as a Dataset (val = last 1% of tokens).

    An optional sidecar ``<name>.json`` may give ``vocab_size``, ``tokenizer`` (path to a
    tokenizer JSON, relative to the sidecar), ``dtype`` ("uint16" default, or "uint32")
    and ``eot_id``. Without a sidecar vocab size, ``vocab_size`` (or the tokenizer's size)
    is the declared vocab size and every token must be below it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"token file {path} does not exist.")
    sidecar_path = path.with_suffix(".json")
    sidecar = _read_sidecar(sidecar_path) if sidecar_path.is_file() else {}
    dtype = BIN_DTYPES[sidecar.get("dtype", "uint16")]

    tokenizer, tok_path = None, None
    if "tokenizer" in sidecar:
        tok_path = (sidecar_path.parent / sidecar["tokenizer"]).expanduser()
        if not tok_path.is_file():
            raise ValueError(
                f"sidecar {sidecar_path} field 'tokenizer' names {tok_path}, which does not exist."
            )
        tokenizer = Tokenizer.load(tok_path)
    if "vocab_size" in sidecar:
        declared = sidecar["vocab_size"]
        if tokenizer is not None and declared < tokenizer.vocab_size:
            raise ValueError(
                f"sidecar {sidecar_path} field 'vocab_size' is {declared}, smaller than its tokenizer's "
                f"{tokenizer.vocab_size} tokens."
            )
    else:
        declared = tokenizer.vocab_size if tokenizer is not None else vocab_size
    # Any size works for ids already made (a character-level vocab of 65, say); the
    # BPE lower bound applies only to training a tokenizer.
    if isinstance(declared, bool) or not isinstance(declared, (int, np.integer)) or not 1 <= declared <= 2**32:
        raise ValueError(f"{path}: vocab size must be an integer in [1, 2**32], got {declared!r}.")
    declared = int(declared)
    if declared > np.iinfo(dtype).max + 1:
        raise ValueError(
            f"{path}: vocab size {declared} does not fit {dtype.name} tokens; set \"dtype\": \"uint32\"."
        )
    eot_id = tokenizer.eot_id if tokenizer is not None else sidecar.get("eot_id")
    if eot_id is not None and eot_id >= declared:
        raise ValueError(
            f"sidecar {sidecar_path} field 'eot_id' is {eot_id}, not below the vocab size {declared}."
        )

    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(
            f"{path} has {size} bytes, not a whole number of {dtype.name} tokens ({dtype.itemsize} bytes each)."
        )
    n = size // dtype.itemsize
    if n < 2:
        raise ValueError(f"{path} holds {n} token(s); at least 2 are needed for a train/val split.")
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    top = int(tokens.max())
    if top >= declared:
        at = _first_index_at_least(tokens, declared)
        raise ValueError(
            f"{path} holds token id {top} (first bad id at index {at}), not below the vocab size {declared}."
        )

    n_val = max(1, math.ceil(n * _check_val_fraction(val_fraction)))
    train_tokens, val_tokens = tokens[: n - n_val], tokens[n - n_val :]
    lengths = None
    if tokenizer is not None:  # ids past the tokenizer (a padded vocab) count as 0 bytes
        lengths = np.zeros(declared, dtype=np.int64)
        lengths[: tokenizer.vocab_size] = tokenizer.token_byte_lengths()
    meta = {
        "format_version": FORMAT_VERSION,
        "source": {"kind": "bin", "path": str(path)},
        "vocab_size": declared,
        "eot_id": eot_id,
        "dtype": dtype.str,
        "train_tokens": int(train_tokens.size),
        "val_tokens": int(val_tokens.size),
        "train_bytes": _byte_count(train_tokens, lengths) if lengths is not None else None,
        "val_bytes": _byte_count(val_tokens, lengths) if lengths is not None else None,
    }
    return Dataset(
        tokenizer=tokenizer, train_tokens=train_tokens, val_tokens=val_tokens, meta=meta, tokenizer_path=tok_path
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nanochat.data [--data PATH] [--vocab N] [--cache DIR]``: build the cache."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nanochat.data", description=main.__doc__)
    parser.add_argument("--data", default=None, help="text file, directory or .bin (default: stdlib)")
    parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE vocab size")
    parser.add_argument("--cache", default=None, help="cache root (default $NANOCHAT_CACHE or ~/.cache)")
    args = parser.parse_args(argv)
    try:
        ds = prepare_data(args.data, args.vocab, args.cache)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    summary = {k: v for k, v in ds.meta.items() if k not in ("val_names", "skipped_files")}
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
