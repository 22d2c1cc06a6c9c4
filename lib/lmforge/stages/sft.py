"""SFT stage: fine-tune the pretrained model on conversations, loss on the assistant turns.

Data is the built-in task conversations (``sft.data: null``) or a record file.
Held-out numbers always come from the built-in ``sft_val`` split: its problems
never appear in any training split, and its records carry reference answers,
so task accuracy and the dismissive rate are measured the same way for every
run, before and after fine-tuning.
"""
from __future__ import annotations

import json
import time

import torch

from lmforge import distributed as dist
from lmforge.config import TrainConfig
from lmforge.data.builtin import make_task_data
from lmforge.data.formats import load_sft
from lmforge.data.prompts import fitting_prompts
from lmforge.errors import LmforgeError
from lmforge.evaluate import greedy_responses, task_metrics
from lmforge.stages.common import (N_SAMPLES, load_trainable, publish, resume_fingerprint, run_summary, sample_logger,
                                   setup)
from lmforge.train.loop import final_weights, train
from lmforge.train.sft import IGNORE, SFTBatches, encode_conversations, evaluate_sft, sft_loss


def user_prompt(record: dict) -> str:
    """The prompt of a held-out task record (``{"messages": [user, assistant], "task", "answer"}``)."""
    return record["messages"][0]["content"]


def rank_sft_loss(pad_id: int):
    """``sft_loss`` plus what several processes need to give one process's numbers: ``loss_count``,
    the trained tokens its mean is over (the loop weights each rank's mean by it), and the real
    tokens of this rank's rows (a padded batch's ``n_real`` counts the whole micro-batch)."""
    def loss_fn(model, batch: dict):
        loss, metrics = sft_loss(model, batch)
        if dist.world_size() == 1:
            return loss, metrics
        tokens = metrics["tokens"] if "doc_ids" in batch else int((batch["input_ids"] != pad_id).sum())
        return loss, {**metrics, "tokens": tokens, "loss_count": int((batch["targets"] != IGNORE).sum())}

    return loss_fn


def train_conversations(params: dict, task_data: dict) -> list[list[dict]]:
    source = params["sft"]["data"]
    if source is None:
        return load_sft(task_data["sft_train"], name="builtin:sft_train")
    return load_sft(source, key="sft.data")


def run(params: dict, inputs: dict, outputs: dict, env) -> dict:
    device = setup(env, params["seed"])
    section = params["sft"]
    tcfg = TrainConfig.from_dict(section, key="sft")
    model, tok, ckpt = load_trainable(inputs["model"], section, "sft", device)
    mcfg = ckpt["model_config"]
    seq = mcfg["max_seq_len"]

    task_data = make_task_data(params["data"]["builtin"], params["seed"])
    train_ex, n_truncated = encode_conversations(tok, train_conversations(params, task_data), seq,
                                                 section["train_on_all"])
    val_records = task_data["sft_val"]
    val_ex, _ = encode_conversations(tok, load_sft(val_records, name="builtin:sft_val"), seq)
    if not train_ex:
        raise LmforgeError(f"sft.data: no conversation keeps an assistant token within model.max_seq_len ({seq})")
    batching = dict(seq_len=seq, pad_id=tok.pad_id, seed=params["seed"], packing=section["packing"], device=device)
    train_batches = SFTBatches(train_ex, batch_size=tcfg.batch_size, grad_accum_steps=tcfg.grad_accum_steps,
                               **batching)
    val_batches = SFTBatches(val_ex, batch_size=tcfg.batch_size, **batching)
    print(f"sft: {len(train_ex)} conversations ({n_truncated} truncated), {train_batches.epoch_steps:.1f} "
          f"steps per epoch, {len(val_ex)} held out, on {device}")

    # A tiny context may not hold every prompt; those are left out of the generation metrics.
    gen_records = fitting_prompts(val_records, tok, seq, user_prompt)
    gen_prompts = [user_prompt(r) for r in gen_records]
    sample_prompts = gen_prompts[:N_SAMPLES]
    before = task_metrics(model, tok, gen_records, gen_prompts)
    fingerprint = resume_fingerprint(params, inputs)

    with env.tracker(params, {"model": inputs["model"]}) as run:
        run.set_tags({"device": str(device)})

        log_samples = sample_logger(run, tok, sample_prompts)

        t0 = time.perf_counter()
        result = train(model, stage="sft", cfg=tcfg, model_config=mcfg, batch_fn=train_batches.batch,
                       loss_fn=rank_sft_loss(tok.pad_id), eval_fn=lambda m: evaluate_sft(m, val_batches),
                       ckpt_dir=env.ckpt_dir, device=device, fingerprint=fingerprint, run=run,
                       on_eval=log_samples)
        wall = time.perf_counter() - t0
        if not dist.is_main():
            return {}  # under torchrun rank 0 alone evaluates and publishes
        model = dist.unwrap(model, lambda: load_trainable(inputs["model"], section, "sft", device)[0])
        model.load_state_dict(final_weights(result, tcfg))
        model.eval()
        final = evaluate_sft(model, val_batches)
        after = task_metrics(model, tok, gen_records, gen_prompts)
        with torch.no_grad():
            replies = greedy_responses(model, tok, sample_prompts)
        metrics = {
            **final, "n_train": len(train_ex), "n_truncated": n_truncated, **run_summary(result, wall, device),
            "heldout": {"pretrained": before, "sft": after, "n": len(gen_records),
                        "n_skipped": len(val_records) - len(gen_records)},
            "samples": [{"prompt": p, "response": r} for p, r in zip(sample_prompts, replies)],
        }
        publish(run, env, params, outputs, model, kind="causal_lm", model_config=mcfg, tokenizer=tok,
                stage="sft", step=result.step, metrics=metrics, base=inputs["model"],
                final_metrics={"final_val_loss": final["val_loss"],
                               **{f"heldout_{k}": v for k, v in after.items()},
                               **{f"pretrained_heldout_{k}": v for k, v in before.items()}})
    print(f"sft: done in {wall:.1f}s, val_loss {final['val_loss']:.4f}, held-out accuracy "
          f"{before['accuracy']:.3f} -> {after['accuracy']:.3f}, dismissive "
          f"{before['dismissive_rate']:.3f} -> {after['dismissive_rate']:.3f}")
    print(json.dumps(metrics["samples"], indent=1))
    return metrics
