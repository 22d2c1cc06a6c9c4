"""Tokenizer stage: train a byte-level BPE on the pretraining text, or adopt an existing one
(``tokenizer.type: pretrained``, or the imported model's with ``model.init_from``)."""
from __future__ import annotations

from pathlib import Path

from lmforge.data.corpus import split_documents
from lmforge.data.sources import describe, load_corpus
from lmforge.files import atomic_write_json
from lmforge.hf import import_tokenizer
from lmforge.tokenizer import LMTokenizer, bytes_per_token


def run(params: dict, inputs: dict, outputs: dict, env) -> dict:
    cfg, data = params["tokenizer"], params["data"]
    docs, specs = load_corpus(data, seed=params["seed"])
    train, val = split_documents(docs, data["val_fraction"])
    with env.tracker(params, inputs) as run:
        if params.get("init_from"):  # model.init_from: the imported model's own tokenizer, converted
            tok = import_tokenizer(params["init_from"])
        elif cfg["type"] == "bpe":
            fit_on = train[: cfg["max_train_docs"]] if cfg["max_train_docs"] else train
            tok = LMTokenizer.train(fit_on, vocab_size=cfg["vocab_size"], min_frequency=cfg["min_frequency"],
                                     split_digits=cfg["split_digits"])
        else:
            tok = LMTokenizer.load(cfg["path"])
        out_dir = Path(outputs["tokenizer"]).parent
        tok.save(out_dir)
        stats = {
            "vocab_size": tok.vocab_size, "tokenizer_sha256": tok.sha256,
            "type": "init_from" if params.get("init_from") else cfg["type"],
            "train_docs": len(train), "heldout_docs": len(val),
            "heldout_bytes_per_token": bytes_per_token(tok, val), "sources": describe(specs),
            "mlflow_run_id": run.run_id,
        }
        atomic_write_json(outputs["stats"], stats)
        run.log_metrics({"heldout_bytes_per_token": stats["heldout_bytes_per_token"],
                         "vocab_size": stats["vocab_size"]}, step=0)
        for f in (outputs["stats"], outputs["tokenizer"], out_dir / "tokenizer_config.json", env.log_path):
            if f:
                run.log_artifact(f)
    print(f"tokenizer: vocab {stats['vocab_size']}, {stats['heldout_bytes_per_token']:.3f} bytes/token on held-out text")
    return stats
