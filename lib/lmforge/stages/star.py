"""STaR stage: rounds of sampling from the model, keeping the verified-correct answers, and SFT on them.

Each round draws ``star.n_prompts`` fresh prompts (the built-in RL prompts
with ``star.data: null``, or a prompt file whose records all carry an
``answer``), samples ``star.k`` answers to each from the current model, keeps
the distinct correct ones (``lmforge.train.star``), then restarts from the SFT
model and fine-tunes it on every sample kept so far, with the SFT batching and
loss and the shared training loop. The next round samples from that model.

Held-out numbers are GRPO's: greedy task accuracy and dismissive rate on the
built-in ``rl_val`` split (problems disjoint from every training split),
measured for the SFT model and after every round. The published model is the
last round's. No checkpoint is picked by held-out accuracy; within a round
the last step's weights are kept (``star.save_best_only`` has nothing to
choose from, as there is no in-round evaluation).

metrics.json ``rounds``: per round the samples drawn (``n_sampled``), the
verified-correct ones (``n_correct``), those kept (``n_kept``: distinct,
finished, new) and the training set size (``n_train``), the cross-entropy per
answer token on that training set before and after the round's training
(``train_loss_start``, ``train_loss``), and the held-out accuracy.
"""
from __future__ import annotations

import hashlib
import json
import time

import torch

from lmforge.config import TrainConfig
from lmforge.data.builtin import make_task_data
from lmforge.device import autocast
from lmforge.evaluate import greedy_responses, task_metrics
from lmforge.stages.common import N_SAMPLES, policy_and_prompts, publish, resume_fingerprint, setup, train_prompts
from lmforge.train.loop import final_weights, train
from lmforge.train.rollout import prompt_stream, sample_rollout
from lmforge.train.sft import SFTBatches, encode_conversations, evaluate_sft, sft_loss
from lmforge.train.star import StarConfig, conversation, keep_correct, require_answers


class RoundRun:
    """The MLflow run as one round's training loop sees it: its steps continue the earlier rounds'."""

    def __init__(self, run, offset: int):
        self.run, self.offset = run, offset

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log_metrics(metrics, step + self.offset)


def samples_digest(samples: list[dict]) -> str:
    """Identity of a training set, for the resume fingerprint of the round that trains on it."""
    text = json.dumps([[s["prompt"], s["response"]] for s in samples], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run(params: dict, inputs: dict, outputs: dict, env) -> dict:
    device = setup(env, params["seed"])
    section = params["star"]
    cfg = StarConfig.from_dict(section, key="star")
    tcfg = TrainConfig.from_dict(section, key="star")

    # ---- data: checked before any model is loaded ---------------------------------
    task_data = make_task_data(params["data"]["builtin"], params["seed"])
    records, source = train_prompts(params, inputs, task_data, "star")
    require_answers(records, source, key="star.data")

    model, tok, ckpt, prompts, heldout, _ = policy_and_prompts("star", section, inputs, records, source,
                                                                task_data, device)
    mcfg = ckpt["model_config"]
    seq = mcfg["max_seq_len"]
    # Every round restarts from these weights (STaR retrains from the initial model each iteration).
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stream = prompt_stream(prompts, cfg.n_prompts, params["seed"])
    print(f"star: {len(prompts)} prompts from {source} ({len(records) - len(prompts)} too long), "
          f"{cfg.rounds} rounds of {cfg.n_prompts} prompts x {cfg.samples_per_prompt} samples, "
          f"{tcfg.max_steps} SFT steps each, on {device}")

    sample_prompts = [r["prompt"] for r in heldout[:N_SAMPLES]]
    with torch.no_grad(), autocast(device):
        before = task_metrics(model, tok, heldout)
    fingerprint = resume_fingerprint(params, inputs)  # each round adds its number and training set
    lineage = {k: inputs[k] for k in ("policy", "data") if inputs.get(k)}

    with env.tracker(params, lineage) as run:
        run.set_tags({"device": str(device)})
        run.log_metrics({"round/heldout_accuracy": before["accuracy"],
                         "round/heldout_dismissive_rate": before["dismissive_rate"]}, step=0)
        t_start = time.perf_counter()
        kept_all: list[dict] = []
        seen: set[tuple[str, str]] = set()
        rounds, history, steps = [], [], 0
        for r in range(1, cfg.rounds + 1):
            # ---- sample from the current model, keep what checks out ------------------
            t0 = time.perf_counter()
            gen = torch.Generator(device=device).manual_seed(params["seed"] * 1_000_003 + r)
            with torch.no_grad(), autocast(device):
                ro = sample_rollout(model, tok, stream(r - 1), n_per_prompt=cfg.samples_per_prompt,
                                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                    top_p=cfg.top_p, generator=gen, batch_size=cfg.sample_batch_size, device=device)
            kept, n_correct = keep_correct(ro.records, ro.responses, ro.finished.tolist(), seen)
            kept_all += kept
            run.log_text("".join(json.dumps(s) + "\n" for s in kept), f"kept/round_{r}.jsonl")
            t_sample = time.perf_counter() - t0

            # ---- restart from the SFT model, fine-tune on everything kept so far ----------
            t0 = time.perf_counter()
            model.load_state_dict(init)
            model.eval()
            stats = {"train_loss_start": None, "train_loss": None, "steps": 0, "n_truncated": 0}
            if kept_all:
                examples, n_truncated = encode_conversations(tok, [conversation(s) for s in kept_all], seq)
                batches = SFTBatches(examples, seq_len=seq, batch_size=tcfg.batch_size, pad_id=tok.pad_id,
                                     seed=params["seed"] + r, packing=section["packing"],
                                     grad_accum_steps=tcfg.grad_accum_steps, device=device)
                stats["train_loss_start"] = evaluate_sft(model, batches)["val_loss"]
                result = train(model, stage="star", cfg=tcfg, model_config=mcfg, batch_fn=batches.batch,
                               loss_fn=sft_loss, eval_fn=None, ckpt_dir=env.ckpt_dir / f"round_{r}", device=device,
                               fingerprint={**fingerprint, "round": r, "train_set": samples_digest(kept_all)},
                               run=RoundRun(run, steps))
                model.load_state_dict(final_weights(result, tcfg))
                model.eval()
                stats.update(train_loss=evaluate_sft(model, batches)["val_loss"], steps=result.step,
                             n_truncated=n_truncated)
            else:
                print(f"star: round {r} kept no correct sample; the model stays the SFT model")
            t_train = time.perf_counter() - t0
            steps += stats["steps"]

            with torch.no_grad(), autocast(device):
                acc = task_metrics(model, tok, heldout)
            entry = {"round": r, "n_prompts": len(ro) // cfg.samples_per_prompt, "n_sampled": len(ro),
                     "n_correct": n_correct, "n_kept": len(kept), "n_train": len(kept_all),
                     "prompts_solved": len({json.dumps(s["prompt"]) for s in kept}), **stats,
                     "heldout": acc, "sample_s": t_sample, "train_s": t_train}
            rounds.append(entry)
            history.append({"step": steps, "round": r, "heldout_accuracy": acc["accuracy"],
                            "heldout_dismissive_rate": acc["dismissive_rate"], "n_train": len(kept_all),
                            **({"train_loss": stats["train_loss"]} if stats["train_loss"] is not None else {})})
            run.log_metrics({"round/n_correct": n_correct, "round/n_kept": len(kept), "round/n_train": len(kept_all),
                             "round/train_loss": stats["train_loss"], "round/heldout_accuracy": acc["accuracy"],
                             "round/heldout_dismissive_rate": acc["dismissive_rate"]}, step=r)
            print(f"star: round {r}: {n_correct} of {len(ro)} samples correct, {len(kept)} kept "
                  f"({len(kept_all)} in all), {stats['steps']} steps, held-out accuracy {acc['accuracy']:.3f} "
                  f"({t_sample:.1f}s sampling, {t_train:.1f}s training)")
        wall = time.perf_counter() - t_start

        with torch.no_grad(), autocast(device):
            replies = greedy_responses(model, tok, sample_prompts)
        after = rounds[-1]["heldout"]
        metrics = {
            **after, "rounds": rounds, "n_train": len(kept_all), "n_prompts": len(prompts),
            "n_prompts_skipped": len(records) - len(prompts), "steps": steps, "wall_s": wall, "device": str(device),
            "history": history,
            "heldout": {"sft": before, "star": after, "n": len(heldout),
                        "n_skipped": len(task_data["rl_val"]) - len(heldout)},
            "samples": [{"prompt": p, "response": reply} for p, reply in zip(sample_prompts, replies)],
        }
        publish(run, env, params, outputs, model, kind="causal_lm", model_config=mcfg, tokenizer=tok,
                stage="star", step=steps, metrics=metrics, base=inputs["policy"],
                final_metrics={"n_train": len(kept_all), **{f"heldout_{k}": v for k, v in after.items()},
                               **{f"sft_heldout_{k}": v for k, v in before.items()}})
    print(f"star: done in {wall:.1f}s, held-out accuracy {before['accuracy']:.3f} -> "
          + " -> ".join(f"{e['heldout']['accuracy']:.3f}" for e in rounds))
    print(json.dumps(metrics["samples"], indent=1))
    return metrics
