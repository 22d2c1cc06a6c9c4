"""GRPO stage: improve the SFT model with group-relative policy optimization on rewarded rollouts.

Prompts are the built-in RL prompts (``grpo.data: null``) or a prompt file;
the reward is ``grpo.reward_fn`` (the schema's default: the verifiable checker alone; the
embedded config adds a tenth of the reward model's score). Only
what the config needs is loaded: the policy, the reference when ``beta > 0``,
the reward model when ``reward_fn.rm > 0``. Held-out numbers come from the
built-in ``rl_val`` split (problems disjoint from every training split):
greedy task accuracy and dismissive rate before (the SFT model) and after.
The best checkpoint is picked on the first ``VAL_PROMPTS`` prompts of
``rl_dev`` (``val_loss = -val_accuracy``), which shares no problem with
``rl_val``: the reported accuracy is not the one selected on.
"""
from __future__ import annotations

import json
import time

import torch

from lmforge.config import TrainConfig
from lmforge.data.builtin import make_task_data
from lmforge.device import autocast
from lmforge.evaluate import greedy_responses, task_metrics
from lmforge.rewards import RewardFunction
from lmforge.stages.common import (N_SAMPLES, policy_and_prompts, publish, resume_fingerprint, run_summary, sample_logger,
                                   setup, train_prompts)
from lmforge.tasks import is_correct
from lmforge.train.grpo import GRPOConfig, grpo_loss, make_rollout
from lmforge.train.loop import final_weights, train
from lmforge.train.policy import load_reference
from lmforge.train.rollout import RolloutSchedule, prompt_stream

VAL_PROMPTS = 500  # rl_dev prompts greedily answered at each evaluation: 100 pick a checkpoint within +-4 points only


def run(params: dict, inputs: dict, outputs: dict, env) -> dict:
    device = setup(env, params["seed"])
    section = params["grpo"]
    cfg = GRPOConfig.from_dict(section, key="grpo")
    # The loop's step is one forward-backward pass of batch_size whole groups (batch_size null resolved).
    tcfg = TrainConfig.from_dict({**section, "batch_size": cfg.batch_size}, key="grpo")
    spec = cfg.reward_fn

    # ---- data: checked before any model is loaded ---------------------------------
    task_data = make_task_data(params["data"]["builtin"], params["seed"])
    records, source = train_prompts(params, inputs, task_data, "grpo")
    spec.check_prompts(records, source, key="grpo.reward_fn")

    model, tok, ckpt, prompts, heldout, dev = policy_and_prompts("grpo", section, inputs, records, source,
                                                                  task_data, device)
    mcfg = ckpt["model_config"]
    val_records = dev[:VAL_PROMPTS]

    # ---- frozen models: only those the config asks for -----------------------------
    reference_path = (inputs.get("reference") or section["reference"] or inputs["policy"]) if cfg.beta > 0 else None
    reference = load_reference(reference_path, inputs["policy"], ckpt, device=device, key="grpo.reference",
                               policy=model) if reference_path else None
    reward_fn = RewardFunction(spec, policy_tokenizer=tok, reward_model_path=inputs.get("reward_model"),
                               device=device, key="grpo.reward_fn")
    print(f"grpo: {len(prompts)} prompts from {source} ({len(records) - len(prompts)} too long), "
          f"{cfg.rollout_batch_size} x {cfg.samples_per_prompt} samples per iteration, {cfg.steps_per_iteration} steps each, "
          f"reference: {reference_path or 'none (beta 0)'}, on {device}")

    # ---- rollouts, scheduled inside the loop ----------------------------------------
    stream = prompt_stream(prompts, cfg.rollout_batch_size * cfg.oversample, params["seed"])
    sampled: dict = {}  # statistics of the current iteration's sampling, logged with each of its steps

    def rollout(iteration: int):
        # Sampling is a pure function of (seed, iteration) and the current policy.
        gen = torch.Generator(device=device).manual_seed(params["seed"] * 1_000_003 + iteration)
        with autocast(device):
            ro, stats = make_rollout(model, tok, stream(iteration), cfg, reward_fn, reference=reference,
                                     generator=gen, device=device)
        sampled.update(stats)
        return ro

    def loss_fn(m, batch):
        loss, metrics = grpo_loss(m, batch, cfg)
        return loss, {**metrics, **sampled}

    schedule = RolloutSchedule(rollout, n_rows=cfg.rollout_batch_size * cfg.samples_per_prompt, n_minibatches=cfg.n_minibatches,
                               ppo_epochs=cfg.ppo_epochs, seed=params["seed"], rows_per_unit=cfg.samples_per_prompt)

    def eval_fn(m) -> dict:
        responses = greedy_responses(m, tok, [r["prompt"] for r in val_records])
        acc = sum(is_correct(s, r["answer"], r["task"]) for s, r in zip(responses, val_records))
        acc /= max(len(val_records), 1)
        return {"val_loss": -acc, "val_accuracy": acc,
                "val_reward": reward_fn(val_records, responses).reward.mean().item()}

    sample_prompts = [r["prompt"] for r in heldout[:N_SAMPLES]]
    before = task_metrics(model, tok, heldout)
    fingerprint = resume_fingerprint(params, inputs)
    lineage = {k: inputs[k] for k in ("policy", "reference", "reward_model", "data") if inputs.get(k)}

    with env.tracker(params, lineage) as run:
        run.set_tags({"device": str(device)})

        log_samples = sample_logger(run, tok, sample_prompts)

        t0 = time.perf_counter()
        result = train(model, stage="grpo", cfg=tcfg, model_config=mcfg, batch_fn=schedule.batch,
                       loss_fn=loss_fn, eval_fn=eval_fn, ckpt_dir=env.ckpt_dir,
                       device=device, fingerprint=fingerprint, run=run, on_eval=log_samples)
        wall = time.perf_counter() - t0
        model.load_state_dict(final_weights(result, tcfg))
        model.eval()
        with torch.no_grad(), autocast(device):
            final = eval_fn(model)
            after = task_metrics(model, tok, heldout)
            replies = greedy_responses(model, tok, sample_prompts)
        metrics = {
            **final, "n_prompts": len(prompts), "n_prompts_skipped": len(records) - len(prompts),
            "reference": str(reference_path) if reference_path else None, **run_summary(result, wall, device),
            "heldout": {"sft": before, "grpo": after, "n": len(heldout), "n_selection": len(val_records),
                        "n_skipped": len(task_data["rl_val"]) - len(heldout)},
            "samples": [{"prompt": p, "response": r} for p, r in zip(sample_prompts, replies)],
        }
        publish(run, env, params, outputs, model, kind="causal_lm", model_config=mcfg, tokenizer=tok,
                stage="grpo", step=result.step, metrics=metrics, base=inputs["policy"],
                final_metrics={"final_val_accuracy": final["val_accuracy"],
                               **{f"heldout_{k}": v for k, v in after.items()},
                               **{f"sft_heldout_{k}": v for k, v in before.items()}})
    print(f"grpo: done in {wall:.1f}s, held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
          f"dismissive {before['dismissive_rate']:.3f} -> {after['dismissive_rate']:.3f}")
    print(json.dumps(metrics["samples"], indent=1))
    return metrics
