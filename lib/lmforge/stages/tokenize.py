"""Tokenize stage: encode the pretraining text into packed uint16/uint32 arrays, split by document."""
from __future__ import annotations

from pathlib import Path

from lmforge.data.corpus import tokenize_corpus
from lmforge.data.sources import describe, load_corpus
from lmforge.tokenizer import LMTokenizer


def run(params: dict, inputs: dict, outputs: dict, env) -> dict:
    data = params["data"]
    tok = LMTokenizer.load(inputs["tokenizer"])
    docs, specs = load_corpus(data, seed=params["seed"])
    with env.tracker(params, inputs) as run:
        meta = tokenize_corpus(tok, docs, Path(outputs["meta"]).parent, val_fraction=data["val_fraction"],
                               sources=describe(specs), extra_meta={"mlflow_run_id": run.run_id})
        run.log_metrics({k: meta[k] for k in ("train_tokens", "val_tokens", "train_docs", "val_docs")}, step=0)
        run.log_artifact(outputs["meta"])
        if env.log_path:
            run.log_artifact(env.log_path)
    print(f"tokenize: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens ({meta['dtype']})")
    return meta
