"""Corpus discovery, split rules, tokenizer, token shards, caching and bad input."""
import json
import os

import numpy as np
import pytest

from nanochat.data import corpus as data_mod
from nanochat.data.corpus import (
    VAL_FRACTION,
    discover_corpus,
    path_hash_fraction,
    prepare_data,
    split_names,
    split_text,
)
from nanochat.data.tokenfile import load_token_file
from nanochat.data.tokenizer import EOT, Tokenizer, load_or_train, resolve_cache_dir

PY_SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\n\nfor name in sorted(os.listdir('.')):\n    print(name)\n",
    "# comment with unicode: café, naïve, 🎉\nvalue = {'key': [1, 2, 3]}\n",
    "try:\n    run()\nexcept ValueError as exc:\n    raise RuntimeError(str(exc)) from None\n",
    "async def fetch(url):\n    async with client.get(url) as r:\n        return await r.text()\n",
]


def python_text(i: int) -> str:
    """A small deterministic Python-looking document."""
    parts = [PY_SNIPPETS[(i + k) % len(PY_SNIPPETS)] for k in range(3)]
    return f'"""Module {i}."""\n' + "\n".join(parts) + f"\nCONSTANT_{i} = {i * 7}\n"


def make_tree(root, n_files=120):
    names = []
    for i in range(n_files):
        sub = root / f"pkg{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"mod_{i:03d}.py"
        path.write_text(python_text(i), encoding="utf-8")
        names.append(path.relative_to(root).as_posix())
    (root / "notes.bin").write_bytes(b"\x00\x01binary, not picked up")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.py").write_text("hidden = True\n")
    return sorted(names)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return Tokenizer.train([python_text(i) for i in range(40)], vocab_size=400)


@pytest.fixture(scope="module")
def tree_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    names = make_tree(root)
    cache = tmp_path_factory.mktemp("cache")
    ds = prepare_data(root, vocab_size=512, cache_dir=cache, progress=False)
    return root, names, cache, ds


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_python_text(tiny_tokenizer):
    tok = tiny_tokenizer
    text = python_text(3) + "\tweird  spacing\r\n\x00 and 中文 and 🎉🎉\n"
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    # BPE actually merges: far fewer tokens than bytes on in-domain text
    assert len(tok.encode(python_text(5))) < 0.6 * len(python_text(5).encode())


def test_tokenizer_special_token_handling(tiny_tokenizer):
    tok = tiny_tokenizer
    text = f"a = 1{EOT}b = 2"
    assert tok.eot_id not in tok.encode(text)  # literal text is not a document boundary
    ids = tok.encode(text, allow_special=True)
    assert ids.count(tok.eot_id) == 1
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "a = 1b = 2"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_tokenizer_vocab_merges_and_bytes(tiny_tokenizer):
    tok = tiny_tokenizer
    vocab = tok.vocab_list
    assert len(vocab) == tok.vocab_size and vocab[tok.eot_id] == EOT
    assert len(set(vocab)) == len(vocab)
    merges = tok.merges
    assert len(merges) == tok.vocab_size - 257  # 256 byte tokens + EOT, then one token per merge
    assert all(a + b in vocab for a, b in merges)
    assert tok.merge_strings()[0] == " ".join(merges[0])
    text = "def f(x):  # 🎉\n    return x\n"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    lengths = tok.token_byte_lengths()
    assert lengths[tok.eot_id] == 0 and lengths.sum() > 0
    assert int(lengths[np.array(ids)].sum()) == len(text.encode("utf-8"))


def test_tokenizer_save_load_and_json(tiny_tokenizer, tmp_path):
    path = tmp_path / "sub" / "tok.json"
    tiny_tokenizer.save(path)
    loaded = Tokenizer.load(path)
    text = python_text(7)
    assert loaded.encode(text) == tiny_tokenizer.encode(text)
    assert loaded.vocab_size == tiny_tokenizer.vocab_size and loaded.eot_id == tiny_tokenizer.eot_id
    again = Tokenizer.from_json_str(tiny_tokenizer.to_json_str())
    assert again.merges == tiny_tokenizer.merges
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_tokenizer_training_is_deterministic():
    texts = [python_text(i) for i in range(30)]
    a = Tokenizer.train(texts, vocab_size=350)
    b = Tokenizer.train(texts, vocab_size=350)
    assert a.to_json_str() == b.to_json_str()


def test_tokenizer_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer"):
        Tokenizer.load(bad)
    with pytest.raises(ValueError, match="vocab_size must be between"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_load_or_train_trains_once(tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return [python_text(i) for i in range(10)]

    path = tmp_path / "tok.json"
    a, trained_a = load_or_train(path, texts, 300)
    b, trained_b = load_or_train(path, texts, 300)
    assert (trained_a, trained_b) == (True, False) and len(calls) == 1
    assert a.to_json_str() == b.to_json_str()


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("NANOCHAT_CACHE")
    assert resolve_cache_dir().name == "nanochat-ternary"


# ---------------------------------------------------------------------------- split rules
def test_split_names_is_deterministic_by_path_hash():
    names = [f"pkg/mod_{i:04d}.py" for i in range(2000)]
    train, val = split_names(names)
    assert split_names(list(names)) == (train, val)
    assert sorted(train + val) == names and not set(train) & set(val)
    assert val == [n for n in names if path_hash_fraction(n) < VAL_FRACTION]
    assert 0.005 < len(val) / len(names) < 0.02
    # a file's side does not depend on which other files exist
    _, val_half = split_names(names[::2])
    assert val_half == [n for n in val if n in names[::2]]


def test_split_names_always_has_both_sides():
    for names in (["a.py", "b.py"], ["x/1.txt", "x/2.txt", "x/3.txt"]):
        train, val = split_names(names)
        assert len(val) >= 1 and len(train) >= 1
    with pytest.raises(ValueError, match="at least 2"):
        split_names(["only.py"])


def test_split_text_cuts_at_a_line_end():
    text = "".join(f"line {i}\n" for i in range(1000))
    train, val = split_text(text)
    assert train + val == text and train.endswith("\n")
    assert 0.005 < len(val) / len(text) < 0.02
    train, val = split_text("ab")
    assert (train, val) == ("a", "b")


def test_stdlib_discovery_and_split():
    corpus = discover_corpus(None)
    assert corpus.kind == "stdlib"
    assert len(corpus.names) > 300
    assert "os.py" in corpus.names and "json/decoder.py" in corpus.names
    parts = {p for n in corpus.names for p in n.split("/")[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert all(n.endswith(".py") for n in corpus.names)
    train, val = corpus.split()  # path-based: reads no file
    train2, val2 = discover_corpus(None).split()
    assert [d.name for d in val] == [d.name for d in val2] and len(train) == len(train2)
    assert 1 <= len(val) and 0.002 < len(val) / len(corpus.names) < 0.03
    assert discover_corpus(None).fingerprint == corpus.fingerprint


# ---------------------------------------------------------------------------- prepare_data
def test_directory_dataset_contents(tree_dataset):
    root, names, cache, ds = tree_dataset
    tok, meta = ds.tokenizer, ds.meta
    assert isinstance(ds.train_tokens, np.memmap) and ds.train_tokens.dtype == np.uint16
    assert meta["vocab_size"] == tok.vocab_size == ds.vocab_size <= 512
    assert ds.eot_id == tok.eot_id
    val_names = meta["val_names"]
    assert val_names == split_names(names)[1]
    assert meta["train_documents"] + meta["val_documents"] == len(names)  # hidden/.bin ignored
    assert meta["train_tokens"] == ds.train_tokens.size and meta["val_tokens"] == ds.val_tokens.size
    # the train stream is the train files in sorted order, each followed by EOT
    train_names = [n for n in names if n not in val_names]
    expected = "".join((root / n).read_text(encoding="utf-8") + EOT for n in train_names)
    assert tok.decode(ds.train_tokens) == expected
    assert int((ds.train_tokens == tok.eot_id).sum()) == len(train_names)
    assert ds.train_tokens[-1] == tok.eot_id and ds.val_tokens[-1] == tok.eot_id
    # raw byte counts for bits per byte
    assert meta["train_bytes"] == sum((root / n).stat().st_size for n in train_names)
    lengths = tok.token_byte_lengths()
    assert int(lengths[ds.val_tokens].sum()) == meta["val_bytes"]
    entry = next((cache / "data").iterdir())
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert json.loads((entry / "meta.json").read_text())["fingerprint"] == meta["fingerprint"]


def test_second_prepare_reuses_the_cache(tree_dataset, monkeypatch):
    root, _, cache, ds = tree_dataset
    entry = next((cache / "data").iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was retrained")

    monkeypatch.setattr(Tokenizer, "train", classmethod(no_training))
    monkeypatch.setattr(data_mod, "_write_shard", no_training)
    again = prepare_data(root, vocab_size=512, cache_dir=cache, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == mtimes
    np.testing.assert_array_equal(again.train_tokens, ds.train_tokens)
    np.testing.assert_array_equal(again.val_tokens, ds.val_tokens)
    assert again.meta == ds.meta


def test_incomplete_cache_reuses_tokenizer_and_rebuilds_shards(tmp_path, monkeypatch):
    root = tmp_path / "c"
    make_tree(root, n_files=30)
    cache = tmp_path / "cache"
    first = prepare_data(root, vocab_size=300, cache_dir=cache, progress=False)
    expected_val = np.array(first.val_tokens)
    del first  # drop the memmaps before damaging the file under them
    entry = next((cache / "data").iterdir())
    (entry / "val.bin").unlink()
    (entry / "val.bin").write_bytes(b"\x00\x00")  # damaged shard: sizes no longer match meta
    monkeypatch.setattr(Tokenizer, "train", classmethod(lambda *a, **k: pytest.fail("retrained")))
    again = prepare_data(root, vocab_size=300, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(again.val_tokens, expected_val)
    assert not again.meta["tokenizer_trained_here"]


def test_changed_corpus_gets_a_new_cache_entry(tmp_path, monkeypatch):
    root = tmp_path / "c"
    make_tree(root, n_files=20)
    cache = tmp_path / "cache"
    prepare_data(root, vocab_size=300, cache_dir=cache, progress=False)
    (root / "pkg0" / "extra.py").write_text("x = 1\n")
    monkeypatch.setenv("NANOCHAT_CACHE", str(cache))  # the env var picks the same cache
    ds = prepare_data(root, vocab_size=300, progress=False)
    assert len(list((cache / "data").iterdir())) == 2
    assert ds.meta["train_documents"] + ds.meta["val_documents"] == 21


def test_non_utf8_files_are_skipped_and_reported(tmp_path):
    root = tmp_path / "c"
    names = make_tree(root, n_files=25)
    (root / "pkg1" / "latin1.py").write_bytes("s = 'café'\n".encode("latin-1"))
    with pytest.warns(UserWarning, match="not UTF-8"):
        ds = prepare_data(root, vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
    assert ds.meta["skipped_files"] == ["pkg1/latin1.py"]
    assert ds.meta["train_documents"] + ds.meta["val_documents"] == len(names)


def test_single_text_file(tmp_path):
    path = tmp_path / "story.txt"
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    path.write_text(text, encoding="utf-8")
    ds = prepare_data(path, vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
    train, val = split_text(text)
    assert ds.tokenizer.decode(ds.train_tokens) == train + EOT
    assert ds.tokenizer.decode(ds.val_tokens) == val + EOT
    assert (ds.meta["train_bytes"], ds.meta["val_bytes"]) == (len(train), len(val))
    assert ds.meta["source"]["kind"] == "file"


def test_large_text_file_is_encoded_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "TEXT_CHUNK_BYTES", 500)
    path = tmp_path / "big.txt"
    text = "".join(python_text(i) for i in range(60))
    path.write_text(text, encoding="utf-8")
    ds = prepare_data(path, vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
    train, _ = split_text(text)
    assert ds.tokenizer.decode(ds.train_tokens) == train + EOT  # one document, one EOT
    assert ds.meta["train_documents"] == 1


def test_tokenizer_subset_rule(monkeypatch, tmp_path):
    root = tmp_path / "c"
    make_tree(root, n_files=40)
    corpus = discover_corpus(root)
    train, _ = corpus.split()
    total = sum(d.nbytes for d in train)
    assert data_mod._tokenizer_subset(train) == train
    subset = data_mod._tokenizer_subset(train, max_bytes=total // 4)
    assert total // 4 <= sum(d.nbytes for d in subset) < total // 2
    by_hash = sorted(train, key=lambda d: path_hash_fraction(d.name))
    assert {d.name for d in subset} == {d.name for d in by_hash[: len(subset)]}
    assert subset == [d for d in train if d in subset]  # corpus order kept


# ---------------------------------------------------------------------------- .bin files
def test_bin_file_without_sidecar(tmp_path, rng):
    tokens = rng.integers(0, 1000, size=5000).astype("<u2")
    path = tmp_path / "toks.bin"
    tokens.tofile(path)
    ds = prepare_data(path, vocab_size=1000, cache_dir=tmp_path / "cache", progress=False)
    assert ds.tokenizer is None and ds.tokenizer_path is None and ds.vocab_size == 1000
    assert ds.val_tokens.size == 50 and ds.train_tokens.size == 4950
    np.testing.assert_array_equal(np.concatenate([ds.train_tokens, ds.val_tokens]), tokens)
    assert ds.meta["train_bytes"] is None
    assert not (tmp_path / "cache").exists()  # a .bin needs no cache


def test_bin_file_with_sidecar_and_tokenizer(tmp_path, tiny_tokenizer):
    text = "".join(python_text(i) for i in range(20))
    ids = np.array(tiny_tokenizer.encode(text) + [tiny_tokenizer.eot_id], dtype="<u4")
    ids.tofile(tmp_path / "corpus.bin")
    tiny_tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    (tmp_path / "corpus.json").write_text(
        json.dumps({"tokenizer": "tok/tokenizer.json", "dtype": "uint32", "vocab_size": 512})
    )
    ds = load_token_file(tmp_path / "corpus.bin")
    assert ds.vocab_size == 512 and ds.eot_id == tiny_tokenizer.eot_id
    assert ds.tokenizer_path == tmp_path / "tok" / "tokenizer.json"
    assert ds.train_tokens.dtype == np.uint32
    assert ds.val_tokens.size == -(-ids.size // 100)
    assert ds.meta["train_bytes"] + ds.meta["val_bytes"] == len(text.encode("utf-8"))
    assert ds.tokenizer.decode(np.concatenate([ds.train_tokens, ds.val_tokens])) == text + EOT


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prepare_data(tmp_path / "nope", cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"missing\.bin does not exist"):
        prepare_data(tmp_path / "missing.bin", cache_dir=tmp_path, progress=False)
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    (empty_dir / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="contains no text files"):
        prepare_data(empty_dir, cache_dir=tmp_path, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        prepare_data(empty, cache_dir=tmp_path, progress=False)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("olé olé\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt is not UTF-8 text \(bad byte at offset 2\)"):
        prepare_data(latin, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="vocab_size must be an integer"):
        prepare_data(None, vocab_size="4096", cache_dir=tmp_path, progress=False)


def test_bad_bin_files(tmp_path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match=r"odd\.bin has 3 bytes, not a whole number of uint16 tokens"):
        load_token_file(odd)
    big = tmp_path / "big.bin"
    np.array([1, 2, 3, 4096, 5], dtype="<u2").tofile(big)
    with pytest.raises(ValueError, match=r"big\.bin holds token id 4096 \(first bad id at index 3\), not below the vocab size 4096"):
        load_token_file(big, vocab_size=4096)
    one = tmp_path / "one.bin"
    np.array([7], dtype="<u2").tofile(one)
    with pytest.raises(ValueError, match="at least 2 are needed"):
        load_token_file(one)
    good = tmp_path / "good.bin"
    np.arange(10, dtype="<u2").tofile(good)
    sidecar = tmp_path / "good.json"
    for content, message in [
        ("{oops", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"vocab": 10}', "unknown field 'vocab'"),
        ('{"vocab_size": -3}', "'vocab_size' must be a non-negative integer"),
        ('{"vocab_size": 5}', "holds token id 9"),
        ('{"dtype": "int8"}', "'dtype' must be one of uint16, uint32"),
        ('{"tokenizer": "nowhere.json"}', "which does not exist"),
        ('{"vocab_size": 100000}', "does not fit uint16"),
        ('{"vocab_size": 300, "eot_id": 300}', "'eot_id' is 300"),
    ]:
        sidecar.write_text(content)
        with pytest.raises(ValueError, match=message):
            load_token_file(good)


def test_prepare_never_leaves_partial_files(tmp_path, monkeypatch):
    root = tmp_path / "c"
    make_tree(root, n_files=20)
    cache = tmp_path / "cache"

    def broken_encode(self, texts):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(Tokenizer, "encode_batch", broken_encode)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        prepare_data(root, vocab_size=300, cache_dir=cache, progress=False)
    entry = next((cache / "data").iterdir())
    assert sorted(p.name for p in entry.iterdir()) == ["tokenizer.json"]  # no shard, no temp, no meta
    assert os.access(entry / "tokenizer.json", os.R_OK)


def test_bin_file_with_a_small_declared_vocab(tmp_path):
    # ids made elsewhere (a character-level vocab, say) need not meet the BPE minimum
    path = tmp_path / "chars.bin"
    np.arange(200, dtype="<u2").__mod__(65).astype("<u2").tofile(path)
    (tmp_path / "chars.json").write_text('{"vocab_size": 65, "eot_id": 0}')
    ds = prepare_data(path, progress=False)
    assert ds.vocab_size == 65 and ds.eot_id == 0 and ds.val_tokens.size == 2
    (tmp_path / "chars.json").write_text('{"vocab_size": 0}')
    with pytest.raises(ValueError, match=r"chars\.json field 'vocab_size' must be an integer in \[1, 1048576\].*got 0"):
        prepare_data(path, progress=False)


def test_directory_whose_validation_files_are_all_undecodable(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    names = ["a.txt", "b.txt", "c.txt"]
    _, val = split_names(names)
    for n in names:
        raw = ("text of " + n + " é\n").encode("latin-1" if n in val else "utf-8")
        (root / n).write_bytes(raw)
    with pytest.raises(ValueError, match="no validation file of .* is UTF-8 text"):
        with pytest.warns(UserWarning):
            prepare_data(root, vocab_size=300, cache_dir=tmp_path / "cache", progress=False)


def test_val_fraction_and_tokenizer_budget_options(tmp_path):
    root = tmp_path / "c"
    names = make_tree(root, n_files=60)
    cache = tmp_path / "cache"
    base = prepare_data(root, vocab_size=300, cache_dir=cache, progress=False)
    assert base.tokenizer_path.is_file() and base.tokenizer_path.parent.parent == cache / "data"
    assert base.meta["tokenizer_train_max_bytes"] == data_mod.TOKENIZER_TRAIN_MAX_BYTES
    wide = prepare_data(root, vocab_size=300, cache_dir=cache, progress=False, val_fraction=0.3)
    assert wide.meta["val_names"] == split_names(names, 0.3)[1]
    assert wide.meta["val_documents"] > base.meta["val_documents"]
    capped = prepare_data(root, vocab_size=300, cache_dir=cache, progress=False, tokenizer_train_bytes=2000)
    assert 2000 <= capped.meta["tokenizer_train_bytes"] < base.meta["tokenizer_train_bytes"]
    uncapped = prepare_data(root, vocab_size=300, cache_dir=cache, progress=False, tokenizer_train_bytes=0)
    assert uncapped.meta["tokenizer_train_max_bytes"] is None
    assert uncapped.meta["tokenizer_train_bytes"] == base.meta["tokenizer_train_bytes"]
    assert len(list((cache / "data").iterdir())) == 4  # one entry per distinct setting
    with pytest.raises(ValueError, match=r"val_fraction must be a number in \(0, 0.5\], got 0.9"):
        prepare_data(root, cache_dir=cache, progress=False, val_fraction=0.9)
    with pytest.raises(ValueError, match="tokenizer_train_bytes must be an integer >= 0"):
        prepare_data(root, cache_dir=cache, progress=False, tokenizer_train_bytes=-1)
