"""DPO stage: align the SFT model on preference pairs against a frozen reference.

The policy starts from the SFT checkpoint; the reference is ``dpo.reference``
when set, else the SFT model itself. The static pairs are ``dpo.data`` (a
record file) or the built-in ``pref_train`` split; ``dpo.on_policy`` swaps them
for the scoring stage's on-policy pairs (true) or mixes both (mixed). The reference's log-probs of every training
pair the run reads and every held-out pair are computed once, before training, and the reference is
then dropped: during training memory holds only the policy and its optimizer.
Held-out numbers always come from the built-in ``pref_val`` split.
"""
from __future__ import annotations

import json
import time

import torch

from lmforge import distributed as dist
from lmforge.data.builtin import make_task_data
from lmforge.data.formats import load_preferences
from lmforge.data.prompts import builtin_pairs, fitting_prompts
from lmforge.errors import LmforgeError
from lmforge.evaluate import greedy_responses
from lmforge.sections import DPOConfig, TrainConfig
from lmforge.stages.common import (N_SAMPLES, load_trainable, publish, resume_fingerprint, run_summary, sample_logger,
                                   setup)
from lmforge.train.dpo import (REFERENCE_FREE, DPOBatches, dpo_loss, dpo_stats, encode_dpo_pairs, evaluate_dpo,
                               reference_logprobs)
from lmforge.train.loop import final_weights, train
from lmforge.train.policy import load_reference


def static_pairs(section: dict, task_data: dict, tok, seq: int) -> tuple[list[dict], int]:
    """(pairs of dpo.data or the builtin set, number left out because the prompt fills the context)."""
    if section["data"]:
        return load_preferences(section["data"], key="dpo.data"), 0
    return builtin_pairs(task_data, "pref_train", tok, seq)


def mix(static: list[dict], on_policy: list[dict], share: float) -> list[dict]:
    """The static pairs plus the on-policy pairs repeated so they make about ``share`` of the result."""
    repeats = max(1, round(share / (1 - share) * len(static) / max(len(on_policy), 1)))
    return static + on_policy * repeats


def train_pairs(section: dict, inputs: dict, task_data: dict, tok, seq: int) -> tuple[list[dict], int]:
    """(training pairs, number left out because the prompt fills the context)."""
    if not section["on_policy"]:
        return static_pairs(section, task_data, tok, seq)
    if "pairs" not in inputs:
        raise LmforgeError(f"config key 'dpo.on_policy' is {section['on_policy']}, but no scored pairs file was given")
    pairs = load_preferences(inputs["pairs"], key="dpo.on_policy")
    kept = fitting_prompts(pairs, tok, seq)  # made by the pipeline for any context: filter like builtin pairs
    skipped = len(pairs) - len(kept)
    if section["on_policy"] is True:
        return kept, skipped
    static, static_skipped = static_pairs(section, task_data, tok, seq)
    return mix(static, kept, section["on_policy_share"]), skipped + static_skipped


def run(params: dict, inputs: dict, outputs: dict, env) -> dict:
    device = setup(env, params["seed"])
    section = params["dpo"]
    beta = float(DPOConfig.from_dict(section, key="dpo").beta)
    tcfg = TrainConfig.from_dict(section, key="dpo")
    dist.check_batch(tcfg.batch_size, "dpo.batch_size")
    loss_kw = dict(beta=beta, loss_type=section["loss_type"], label_smoothing=section["label_smoothing"],
                   simpo_gamma_beta_ratio=section["simpo_gamma_beta_ratio"], orpo_lambda=section["orpo_lambda"])
    reference_free = section["loss_type"] in REFERENCE_FREE
    # LoRA: the policy starts as the base exactly (B = 0)
    policy, tok, ckpt = load_trainable(inputs["policy"], section, "dpo", device)
    mcfg = ckpt["model_config"]
    reference = inputs.get("reference")
    ref_model = (load_reference(reference, inputs["policy"], ckpt, device=device, key="dpo.reference")
                 if reference and not reference_free else None)
    seq = mcfg["max_seq_len"] if ref_model is None else min(mcfg["max_seq_len"], ref_model.cfg.max_seq_len)

    task_data = make_task_data(params["data"]["builtin"], params["seed"])
    pairs, n_skipped = train_pairs(section, inputs, task_data, tok, seq)
    val_pairs, n_val_skipped = builtin_pairs(task_data, "pref_val", tok, seq)
    if not pairs or not val_pairs:
        raise LmforgeError(f"dpo: no preference prompt fits model.max_seq_len ({seq}); raise it")
    train_ex, val_ex = encode_dpo_pairs(tok, pairs, seq), encode_dpo_pairs(tok, val_pairs, seq)
    n_truncated = sum(e.truncated for e in train_ex)

    batching = dict(pad_id=tok.pad_id, seed=params["seed"], device=device)
    train_batches = DPOBatches(train_ex, None, batch_size=tcfg.batch_size,
                               grad_accum_steps=tcfg.grad_accum_steps, **batching)
    val_batches = DPOBatches(val_ex, None, batch_size=tcfg.batch_size, **batching)
    # The reference is frozen: score each pair the run will read with it once, then let it go (the
    # training stream may hold more pairs than max_steps reaches). Without dpo.reference it is the
    # SFT model, i.e. the policy before its first step (a resumed run loads its weights later).
    # A reference-free loss (simpo, orpo) reads log p_ref = 0 and never runs a reference.
    t0 = time.perf_counter()
    scorer = ref_model if ref_model is not None else policy
    cache = dict(batch_size=tcfg.batch_size, pad_id=tok.pad_id, device=device)
    if reference_free:
        train_batches.set_reference(torch.zeros(len(train_ex), 2))
        val_batches.set_reference(torch.zeros(len(val_ex), 2))
    else:
        train_batches.set_reference(reference_logprobs(scorer, train_ex, **cache,
                                                       only=train_batches.needed(tcfg.max_steps, tcfg.eval_steps)))
        val_batches.set_reference(reference_logprobs(scorer, val_ex, **cache))
    del scorer, ref_model
    ref_s = time.perf_counter() - t0

    print(f"dpo: {len(train_ex)} pairs ({n_truncated} truncated, {n_skipped} left out: prompt too long), "
          f"{len(val_ex)} held out, beta {beta}, loss {section['loss_type']}, {tcfg.grad_accum_steps}x"
          f"{tcfg.batch_size} pairs per step, reference log-probs in {ref_s:.1f}s, on {device}")

    sample_prompts = [r["prompt"] for r in fitting_prompts(task_data["pref_val"], tok, seq)[:N_SAMPLES]]
    fingerprint = resume_fingerprint(params, inputs)
    lineage = {k: inputs[k] for k in ("policy", "reference", "data", "pairs") if inputs.get(k)}
    with env.tracker(params, lineage) as run:
        run.set_tags({"device": str(device)})

        log_samples = sample_logger(run, tok, sample_prompts)

        t0 = time.perf_counter()
        result = train(policy, stage="dpo", cfg=tcfg, model_config=mcfg, batch_fn=train_batches.batch,
                       loss_fn=lambda m, b: dpo_loss(m, b, **loss_kw, rpo_alpha=section["rpo_alpha"]),
                       eval_fn=lambda m: evaluate_dpo(m, val_batches, **loss_kw),
                       ckpt_dir=env.ckpt_dir, device=device, fingerprint=fingerprint, run=run,
                       on_eval=log_samples)
        wall = time.perf_counter() - t0
        if not dist.is_main():
            return {}  # under torchrun rank 0 alone evaluates and publishes
        policy = dist.unwrap(policy, lambda: load_trainable(inputs["policy"], section, "dpo", device)[0])
        policy.load_state_dict(final_weights(result, tcfg))
        policy.eval()
        with torch.no_grad():
            final = evaluate_dpo(policy, val_batches, **loss_kw)
            # TRL's training metrics of the published model, on a fixed slice of the training pairs.
            train_end = dpo_stats(policy, train_batches, limit=tcfg.eval_steps, **loss_kw)
            replies = greedy_responses(policy, tok, sample_prompts)
        metrics = {
            **final, **train_end, "n_train": len(train_ex), "n_val": len(val_ex), "n_truncated": n_truncated,
            "n_skipped": n_skipped, "n_val_skipped": n_val_skipped, "beta": beta, "loss_type": section["loss_type"],
            "reference_s": ref_s, **run_summary(result, wall, device),
            "samples": [{"prompt": p, "response": r} for p, r in zip(sample_prompts, replies)],
        }
        publish(run, env, params, outputs, policy, kind="causal_lm", model_config=mcfg, tokenizer=tok,
                stage="dpo", step=result.step, metrics=metrics, base=inputs["policy"],
                final_metrics={f"final_{k}": v for k, v in final.items()})
    print(f"dpo: done in {wall:.1f}s, held-out accuracy {final['val_accuracy']:.3f}, "
          f"margin {final['val_margin']:.3f}")
    print(json.dumps(metrics["samples"], indent=1))
    return metrics
