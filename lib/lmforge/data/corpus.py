"""Pretraining corpus: a stable train/val split by document, and packed token files."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.files import atomic_write_json


def is_val_document(text: str, val_fraction: float) -> bool:
    """A document's split depends on its content only, so it never moves when others are added."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    train, val = [], []
    for d in docs:
        (val if is_val_document(d, val_fraction) else train).append(d)
    if not train or not val:
        raise LmforgeError(
            f"data.val_fraction={val_fraction} leaves {len(train)} train and {len(val)} val documents "
            f"out of {len(docs)}; both splits need at least one")
    return train, val


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_tokens(tokenizer, docs: Sequence[str], path: str | Path, dtype: str, batch: int = 1024) -> int:
    """Encode documents (BOS + text + EOS each) in batches into one flat binary file. Returns tokens written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with open(tmp, "wb") as f:
        for i in range(0, len(docs), batch):
            ids = [tokenizer.document(e) for e in tokenizer.encode_batch(docs[i:i + batch])]
            arr = np.fromiter((t for doc in ids for t in doc), dtype=np.dtype(dtype))
            f.write(arr.tobytes())
            n += len(arr)
    tmp.replace(path)
    return n


def tokenize_corpus(tokenizer, docs: Sequence[str], out_dir: str | Path, *, val_fraction: float,
                    sources: list, extra_meta: dict | None = None) -> dict:
    """Write train.bin, val.bin and meta.json into ``out_dir``; return the meta."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = split_documents(docs, val_fraction)
    dtype = token_dtype(tokenizer.vocab_size)
    n_train = write_tokens(tokenizer, train, out_dir / "train.bin", dtype)
    n_val = write_tokens(tokenizer, val, out_dir / "val.bin", dtype)
    meta = {
        "dtype": dtype, "vocab_size": tokenizer.vocab_size, "tokenizer_sha256": tokenizer.sha256,
        "train_docs": len(train), "val_docs": len(val), "train_tokens": n_train, "val_tokens": n_val,
        "train_bytes": sum(len(d.encode()) for d in train), "val_bytes": sum(len(d.encode()) for d in val),
        "sources": sources, **(extra_meta or {}),
    }
    # Bytes per token counts the BOS/EOS markers as tokens, so bits-per-byte is slightly conservative.
    meta["val_bytes_per_token"] = meta["val_bytes"] / max(n_val, 1)
    atomic_write_json(out_dir / "meta.json", meta)
    return meta
