"""Pretraining corpus: a content-stable split and token files equal to BOS + ids + EOS per document."""

import hashlib
import json

import numpy as np
import pytest

from lmforge.data.corpus import (
    is_val_document, split_documents, token_dtype, tokenize_corpus, write_tokens,
)
from lmforge.errors import LmforgeError
from lmforge.tokenizer import LMTokenizer

DOCS = [f"Document {i}: the {'quick ' * (i % 4)}fox number {i * 7} jumps." for i in range(200)]


@pytest.fixture(scope="module")
def tok() -> LMTokenizer:
    return LMTokenizer.train(DOCS, vocab_size=300)


def reference_is_val(text: str, fraction: float) -> bool:
    """The rule written out: the first 8 bytes of sha256(text), as a fraction of 2**64, below val_fraction."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) < fraction * 2**64


def test_split_matches_reference_rule():
    train, val = split_documents(DOCS, 0.2)
    assert val == [d for d in DOCS if reference_is_val(d, 0.2)]
    assert train == [d for d in DOCS if not reference_is_val(d, 0.2)]
    assert 20 <= len(val) <= 60  # ~40 expected of 200


def test_split_is_stable_and_by_content():
    train, val = split_documents(DOCS, 0.2)
    more = [f"An extra document {i}." for i in range(300)]
    mixed = more[:150] + DOCS[::-1] + more[150:]  # new docs around, old ones reordered
    train2, val2 = split_documents(mixed, 0.2)
    assert set(val) <= set(val2) and set(train) <= set(train2)
    assert set(val2) - set(val) == {d for d in more if is_val_document(d, 0.2)}
    assert split_documents(DOCS, 0.2) == (train, val)  # deterministic across calls


def test_split_grows_monotonically_with_fraction():
    _, small = split_documents(DOCS, 0.1)
    _, large = split_documents(DOCS, 0.3)
    assert set(small) < set(large)


@pytest.mark.parametrize("fraction", [1e-9, 0.999999999])
def test_empty_split_is_an_error(fraction):
    with pytest.raises(LmforgeError, match=rf"data\.val_fraction={fraction}") as e:
        split_documents(DOCS[:5], fraction)
    assert "out of 5" in str(e.value)


def test_token_dtype():
    assert token_dtype(2048) == "uint16" and token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_write_tokens_layout(tok, tmp_path):
    docs = DOCS[:7]
    path = tmp_path / "x.bin"
    n = write_tokens(tok, docs, path, "uint16", batch=3)  # several batches
    expected = [t for d in docs for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]
    arr = np.fromfile(path, dtype=np.uint16)
    assert n == len(expected) == len(arr)
    assert arr.tolist() == expected
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]  # no temp file left


def test_tokenize_corpus_files_and_meta(tok, tmp_path):
    out = tmp_path / "data"
    meta = tokenize_corpus(tok, DOCS, out, val_fraction=0.2, sources=["builtin"], extra_meta={"note": "x"})
    train, val = split_documents(DOCS, 0.2)

    def flat(docs):
        return [t for d in docs for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]

    assert meta["dtype"] == "uint16"
    assert np.fromfile(out / "train.bin", dtype=np.uint16).tolist() == flat(train)
    assert np.fromfile(out / "val.bin", dtype=np.uint16).tolist() == flat(val)
    assert meta["train_docs"] == len(train) and meta["val_docs"] == len(val)
    assert meta["train_tokens"] == len(flat(train)) and meta["val_tokens"] == len(flat(val))
    assert meta["train_bytes"] == sum(len(d.encode()) for d in train)
    assert meta["val_bytes"] == sum(len(d.encode()) for d in val)
    assert meta["val_bytes_per_token"] == pytest.approx(meta["val_bytes"] / len(flat(val)))
    assert meta["vocab_size"] == tok.vocab_size and meta["tokenizer_sha256"] == tok.sha256
    assert meta["sources"] == ["builtin"] and meta["note"] == "x"
    assert json.loads((out / "meta.json").read_text()) == meta
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_tokenize_corpus_empty_split_writes_nothing(tok, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(LmforgeError, match="val_fraction"):
        tokenize_corpus(tok, DOCS[:3], out, val_fraction=1e-9, sources=[])
    assert list(out.iterdir()) == []
