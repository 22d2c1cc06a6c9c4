"""Reward stage: a Bradley-Terry reward model on preference pairs, its trunk initialised from SFT.

Pairs are the built-in preference data (``reward.data: null``) or a record
file; the held-out numbers always come from the built-in ``pref_val`` split,
whose problems no training split contains.
"""
from __future__ import annotations

import time

from lmforge.config import TrainConfig
from lmforge.data.builtin import make_task_data
from lmforge.data.formats import load_preferences
from lmforge.data.prompts import builtin_pairs
from lmforge.stages.common import load_trainable, publish, resume_fingerprint, run_summary, setup
from lmforge.errors import LmforgeError
from lmforge.model import RewardModel
from lmforge.train.loop import final_weights, train
from lmforge.train.reward import PairBatches, encode_pairs, evaluate_reward, reward_loss


def with_default_margin(pairs: list[dict], margin: float | None) -> list[dict]:
    """Pairs whose data gives no margin get ``reward.margin`` (a margin in the data wins)."""
    if margin is None:
        return pairs
    return [{**p, "margin": float(margin) if p["margin"] is None else p["margin"]} for p in pairs]


def run(params: dict, inputs: dict, outputs: dict, env) -> dict:
    device = setup(env, params["seed"])
    section = params["reward"]
    tcfg = TrainConfig.from_dict(section, key="reward")
    # before the head: a LoRA reward model trains adapters + head
    trunk, tok, ckpt = load_trainable(inputs["model"], section, "reward")
    mcfg = ckpt["model_config"]
    model = RewardModel(trunk).to(device)  # the score head is fresh; everything else is the SFT model
    seq = mcfg["max_seq_len"]

    task_data = make_task_data(params["data"]["builtin"], params["seed"])
    if section["data"] is None:
        pairs, n_skipped = builtin_pairs(task_data, "pref_train", tok, seq)
    else:
        pairs, n_skipped = load_preferences(section["data"], key="reward.data"), 0
    train_ex = encode_pairs(tok, with_default_margin(pairs, section["margin"]), seq)
    val_pairs, n_val_skipped = builtin_pairs(task_data, "pref_val", tok, seq)
    if not train_ex or not val_pairs:
        raise LmforgeError(f"reward: no builtin preference prompt fits model.max_seq_len ({seq}); raise it")
    val_ex = encode_pairs(tok, val_pairs, seq)
    n_truncated = sum(e.truncated for e in train_ex)
    batching = dict(pad_id=tok.pad_id, seed=params["seed"], device=device)
    train_batches = PairBatches(train_ex, batch_size=tcfg.batch_size, grad_accum_steps=tcfg.grad_accum_steps,
                                **batching)
    val_batches = PairBatches(val_ex, batch_size=tcfg.batch_size, **batching)
    center = section["center_coef"]
    print(f"reward: {len(train_ex)} pairs ({n_truncated} truncated, {n_skipped} left out: prompt too long), "
          f"{len(val_ex)} held out, on {device}")

    fingerprint = resume_fingerprint(params, inputs)
    with env.tracker(params, {"model": inputs["model"]}) as run:
        run.set_tags({"device": str(device)})
        t0 = time.perf_counter()
        result = train(model, stage="reward", cfg=tcfg, model_config=mcfg, batch_fn=train_batches.batch,
                       loss_fn=lambda m, b: reward_loss(m, b, center_coef=center),
                       eval_fn=lambda m: evaluate_reward(m, val_batches, center_coef=center),
                       ckpt_dir=env.ckpt_dir, device=device, fingerprint=fingerprint, run=run)
        wall = time.perf_counter() - t0
        model.load_state_dict(final_weights(result, tcfg))
        final = evaluate_reward(model.eval(), val_batches, center_coef=center)
        metrics = {**final, "n_train": len(train_ex), "n_val": len(val_ex), "n_truncated": n_truncated,
                   "n_skipped": n_skipped, "n_val_skipped": n_val_skipped, **run_summary(result, wall, device)}
        publish(run, env, params, outputs, model, kind="reward_model", model_config=mcfg, tokenizer=tok,
                stage="reward", step=result.step, metrics=metrics, base=inputs["model"],
                final_metrics={f"final_{k}": v for k, v in final.items()})
    print(f"reward: done in {wall:.1f}s, held-out accuracy {final['val_accuracy']:.3f}, "
          f"margin {final['val_margin']:.3f}")
    return metrics
