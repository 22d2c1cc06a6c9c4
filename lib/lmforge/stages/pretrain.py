"""Pretrain stage: next-token prediction on the packed corpus, from scratch (or an imported model)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from lmforge import distributed as dist
from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError
from lmforge.hf import init_model
from lmforge.model import ModelConfig, Transformer
from lmforge.stages.common import log_estimate, publish, resume_fingerprint, run_summary, setup, training_options
from lmforge.tokenizer import LMTokenizer
from lmforge.train.lm import TokenWindows, evaluate_lm, lm_loss
from lmforge.train.loop import TrainResult, final_weights, train


def build_model(model_params: dict, tok: LMTokenizer) -> tuple[Transformer, ModelConfig]:
    if model_params.get("init_from"):  # shape and weights of an imported Hugging Face model
        return init_model(model_params, tok)
    cfg = ModelConfig.from_section(model_params)
    if tok.vocab_size > cfg.vocab_size:
        raise LmforgeError(f"the tokenizer has {tok.vocab_size} tokens but 'model.vocab_size' is "
                           f"{cfg.vocab_size}; raise model.vocab_size to at least {tok.vocab_size}")
    return Transformer(cfg), cfg


def run(params: dict, inputs: dict, outputs: dict, env) -> dict:
    device = setup(env, params["seed"])
    tcfg = TrainConfig.from_dict(params["pretrain"], key="pretrain")
    tok = LMTokenizer.load(inputs["tokenizer"])
    meta = json.loads(Path(inputs["meta"]).read_text())
    if meta["tokenizer_sha256"] != tok.sha256:
        raise LmforgeError(f"{inputs['meta']}: the token files were made with another tokenizer; rerun the tokenize rule")
    model, mcfg = build_model(params["model"], tok)
    model.to(device)
    training_options(model, params["pretrain"], "pretrain")  # gradient_checkpointing, compile (pretrain has no lora key)
    n_params, n_non_emb = model.num_params(), model.num_params(non_embedding=True)
    print(f"pretrain: model has {n_params:,} parameters ({n_non_emb:,} non-embedding) on {device}")
    log_estimate("pretrain", mcfg, params["pretrain"], device)

    seq = mcfg.max_seq_len
    train_windows = TokenWindows(inputs["train"], meta["dtype"], seq, tcfg.batch_size, params["seed"], device)
    val_windows = TokenWindows(inputs["val"], meta["dtype"], seq, tcfg.batch_size, params["seed"], device)
    bpt = meta["val_bytes_per_token"]
    fingerprint = resume_fingerprint(params, inputs)

    with env.tracker(params, {k: inputs[k] for k in ("tokenizer", "train", "val")}) as run:
        run.set_tags({"device": str(device), "n_params": n_params})
        t0 = time.perf_counter()
        if tcfg.max_steps:
            result = train(model, stage="pretrain", cfg=tcfg, model_config=mcfg.to_dict(),
                           batch_fn=train_windows.batch, loss_fn=lm_loss,
                           eval_fn=lambda m: evaluate_lm(m, val_windows, tcfg.eval_steps, bpt),
                           ckpt_dir=env.ckpt_dir, device=device, fingerprint=fingerprint, run=run)
        else:  # max_steps 0: publish the initial model as it is (with model.init_from, a pure conversion)
            result = TrainResult(step=0, best_val=None, best_step=None, last_path=None, best_path=None,
                                 stopped_early=False)
        wall = time.perf_counter() - t0
        if not dist.is_main():
            return {}  # under torchrun rank 0 alone evaluates and publishes
        model = dist.unwrap(model, lambda: build_model(params["model"], tok)[0].to(device))
        if tcfg.max_steps:
            model.load_state_dict(final_weights(result, tcfg))
        final = evaluate_lm(model.eval(), val_windows, tcfg.eval_steps, bpt)
        metrics = {**final, **run_summary(result, wall, device), "n_params": n_params,
                   "n_params_non_embedding": n_non_emb}
        publish(run, env, params, outputs, model, kind="causal_lm", model_config=mcfg.to_dict(), tokenizer=tok,
                stage="pretrain", step=result.step, metrics=metrics,
                final_metrics={f"final_{k}": v for k, v in final.items()})
    print(f"pretrain: done in {wall:.1f}s, val_loss {final['val_loss']:.4f}, bpb {final['val_bpb']:.4f}")
    return metrics
