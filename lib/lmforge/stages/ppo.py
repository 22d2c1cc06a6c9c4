"""PPO stage: the SFT policy trained on its own samples against a reward function, KL-tied to a reference.

Prompts are the built-in RL prompts (``ppo.data: null``) or a prompt record
file. In memory: the policy, the critic (a second trunk when ``value_model:
separate``), the frozen reference (``ppo.reference`` or the SFT model, loaded
once) and the reward model when ``reward_fn.rm > 0``; the last two in eval mode
without gradients. Held-out numbers come from the built-in ``rl_val`` prompts,
whose problems no training split contains, for the SFT model before and the PPO
model after: greedy answers (reward, task accuracy, rate of answers that never
end) and one sampled answer per prompt as in training (reward, score, KL to the
reference), drawn with a fixed generator so both models see the same draws.
Every evaluation during training measures the same on the ``rl_dev`` prompts (a
few seconds for the default 200), which share no problem with ``rl_val``; the
best-by-val weights are those with the highest score of sampled answers there
(``val_loss`` = -score), so the reported ``rl_val`` numbers are not selected on.
"""
from __future__ import annotations

import json
import time

import torch

from lmforge.data.builtin import make_task_data
from lmforge.data.formats import load_prompts
from lmforge.data.prompts import fitting_prompts, prompt_ids
from lmforge.device import autocast
from lmforge.errors import LmforgeError
from lmforge.rewards import RewardFunction, RewardSpec
from lmforge.stages.common import N_SAMPLES, load_trainable, publish, resume_fingerprint, run_summary, setup
from lmforge.tasks import is_correct
from lmforge.train.loop import final_weights, train
from lmforge.train.policy import load_reference, token_logprobs
from lmforge.train.ppo import (KLController, PolicyAndValue, PPOSettings, ppo_loss, prepare_rollout, sequence_scores,
                               train_config)
from lmforge.train.rollout import RolloutSchedule, prompt_stream, sample_rollout

GEN_BATCH = 64  # prompts per generation batch in evaluation


def train_prompts(section: dict, task_data: dict, tok, max_seq_len: int) -> tuple[list[dict], str]:
    """(training prompts, where they come from). Builtin prompts that do not fit are left out;
    a prompt of the user's file that does not fit is an error naming it."""
    if section["data"] is None:
        records = fitting_prompts(load_prompts(task_data["rl_train"], key="ppo.data", name="builtin:rl_train"), tok,
                                  max_seq_len)
        if not records:
            raise LmforgeError(f"ppo: no builtin RL prompt fits model.max_seq_len ({max_seq_len}); raise it")
        return records, "builtin:rl_train"
    records = load_prompts(section["data"], key="ppo.data")
    for r in records:
        n = len(prompt_ids(tok, r["prompt"], r["where"]))
        if n >= max_seq_len:
            raise LmforgeError(f"{r['where']}: the prompt has {n} tokens, leaving no room for a response within "
                               f"model.max_seq_len ({max_seq_len})")
    if not records:
        raise LmforgeError(f"config key 'ppo.data': {section['data']} holds no prompts")
    return records, f"'ppo.data' ({section['data']})"


@torch.no_grad()
def heldout_metrics(policy, tok, records: list[dict], reward_fn: RewardFunction, *, max_new_tokens: int,
                    missing_eos_penalty: float, device) -> tuple[dict, list[str]]:
    """Greedy answers to held-out prompts: ({reward, score, missing_eos_rate, response_length[, accuracy]}, answers).

    score = reward - missing_eos_penalty for answers that never emit ``<|end|>`` (what PPO maximises).
    """
    ro = sample_rollout(policy, tok, records, n_per_prompt=1, max_new_tokens=max_new_tokens, temperature=0.0,
                        batch_size=GEN_BATCH, device=device)
    rewards = reward_fn(ro.records, ro.responses, ro.response_ids)
    scores = sequence_scores(rewards.reward, ro.finished, missing_eos_penalty)
    out = {"reward": rewards.reward.mean().item(), "score": scores.mean().item(),
           "missing_eos_rate": (~ro.finished).float().mean().item(), "response_length": ro.lengths.mean().item()}
    if rewards.rm is not None:
        out["rm_score"] = rewards.rm.mean().item()
    checked = [(resp, r) for resp, r in zip(ro.responses, records) if r.get("answer") is not None]
    if checked:
        out["accuracy"] = sum(is_correct(resp, r["answer"], r["task"]) for resp, r in checked) / len(checked)
    return out, ro.responses


@torch.no_grad()
def heldout_sampled(policy, reference, tok, records: list[dict], reward_fn: RewardFunction, *, s: PPOSettings,
                    section: dict, seed: int, device) -> dict:
    """One sample per held-out prompt, drawn as in training: {reward, score, kl, missing_eos_rate, response_length}.

    kl is the mean sequence KL(policy || reference): k1 summed over each sample's tokens.
    A generator of its own, seeded the same at every call, leaves the training
    RNG alone and makes two models' numbers differ by the models, not the draws.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    ro = sample_rollout(policy, tok, records, n_per_prompt=1, max_new_tokens=section["max_new_tokens"],
                        temperature=s.temperature, top_k=section["top_k"], top_p=section["top_p"],
                        generator=generator, batch_size=GEN_BATCH, device=device)
    rewards = reward_fn(ro.records, ro.responses, ro.response_ids)
    logp = token_logprobs(policy, ro.batch, temperature=s.temperature)
    ref_logp = token_logprobs(reference, ro.batch, temperature=s.temperature)
    return {"reward": rewards.reward.mean().item(),
            "score": sequence_scores(rewards.reward, ro.finished, s.missing_eos_penalty).mean().item(),
            "kl": (logp - ref_logp).sum(-1).mean().item(), "missing_eos_rate": (~ro.finished).float().mean().item(),
            "response_length": ro.lengths.mean().item()}


def run(params: dict, inputs: dict, outputs: dict, env) -> dict:
    device = setup(env, params["seed"])
    section = params["ppo"]
    tcfg, n_minibatches = train_config(section)
    s = PPOSettings.from_section(section)
    spec = RewardSpec.from_dict(section["reward_fn"], key="ppo.reward_fn")
    # before the critic copies the policy: it gets adapters too
    policy, tok, ckpt = load_trainable(inputs["policy"], section, "ppo", device)
    mcfg = ckpt["model_config"]
    seq = mcfg["max_seq_len"]

    # Data before the reference and the reward model: a prompt set the reward cannot score fails early.
    task_data = make_task_data(params["data"]["builtin"], params["seed"])
    prompts, source = train_prompts(section, task_data, tok, seq)
    spec.check_prompts(prompts, source, "ppo.reward_fn")
    val_records = fitting_prompts(load_prompts(task_data["rl_val"], key="ppo", name="builtin:rl_val"), tok, seq)
    dev_records = fitting_prompts(load_prompts(task_data["rl_dev"], key="ppo", name="builtin:rl_dev"), tok, seq)
    if not val_records or not dev_records:
        raise LmforgeError(f"ppo: no builtin held-out prompt fits model.max_seq_len ({seq}); raise it")
    sample_records = val_records[:N_SAMPLES]

    reference_path = inputs.get("reference") or inputs["policy"]
    reference = load_reference(reference_path, inputs["policy"], ckpt, device=device, key="ppo.reference",
                               policy=policy)
    reward_fn = RewardFunction(spec, policy_tokenizer=tok, reward_model_path=inputs.get("reward_model"),
                               device=device, key="ppo.reward_fn")
    rollouts = section["rollout_batch_size"]  # per iteration
    kl = KLController(s.kl_coef, s.kl_target, s.kl_horizon, n=rollouts)
    model = PolicyAndValue(policy, value_model=section["value_model"], kl=kl).to(device)
    print(f"ppo: {len(prompts)} prompts from {source}, {rollouts} rollouts per iteration, "
          f"{n_minibatches * section['ppo_epochs']} optimizer steps per iteration, value model "
          f"{section['value_model']}, {len(val_records)} held out, on {device}")

    gen = dict(max_new_tokens=section["max_new_tokens"], missing_eos_penalty=s.missing_eos_penalty, device=device)
    sampled = dict(s=s, section=section, seed=params["seed"], device=device)
    next_prompts = prompt_stream(prompts, rollouts, params["seed"])
    rollout_stats: dict = {}
    iterations: list[dict] = []

    def make_rollout(iteration: int):
        coef = model.kl.coef_for(iteration)
        with torch.no_grad(), autocast(device):
            ro = sample_rollout(model.policy, tok, next_prompts(iteration), n_per_prompt=1,
                                max_new_tokens=section["max_new_tokens"], temperature=s.temperature,
                                top_k=section["top_k"], top_p=section["top_p"], device=device)
            rewards = reward_fn(ro.records, ro.responses, ro.response_ids)
            scores = sequence_scores(rewards.reward, ro.finished, s.missing_eos_penalty)
            stats = prepare_rollout(model, reference, ro, scores, kl_coef=coef, s=s)
        model.kl.observe(iteration, stats["objective/kl"])
        stats["env/reward_mean"] = rewards.reward.mean().item()
        stats["env/missing_eos_rate"] = (~ro.finished).float().mean().item()
        if rewards.correct is not None:
            stats["env/accuracy"] = torch.nan_to_num(rewards.correct, nan=0.0).mean().item()
        rollout_stats.clear()
        rollout_stats.update(stats)
        iterations.append({"iteration": iteration, **stats})
        return ro

    schedule = RolloutSchedule(make_rollout, n_rows=rollouts, n_minibatches=n_minibatches,
                               ppo_epochs=section["ppo_epochs"], seed=params["seed"])

    def loss_fn(m: PolicyAndValue, batch: dict):
        loss, metrics = ppo_loss(m, batch, s=s)
        return loss, {**metrics, **rollout_stats}  # the iteration's rollout statistics, logged at each of its steps

    def eval_fn(m: PolicyAndValue) -> dict:
        h, _ = heldout_metrics(m.policy, tok, dev_records, reward_fn, **gen)
        h_sampled = heldout_sampled(m.policy, reference, tok, dev_records, reward_fn, **sampled)
        # The best checkpoint is the one with the highest held-out score of sampled answers: what PPO
        # maximises. Greedy answers of the SFT model already score near the reward model's ceiling, so
        # their reward barely moves and would pick checkpoints by noise.
        return {"val_loss": -h_sampled["score"], **{f"val_{k}": v for k, v in h.items()},
                **{f"val_sampled_{k}": v for k, v in h_sampled.items()}}

    before, before_samples = heldout_metrics(model.policy, tok, val_records, reward_fn, **gen)
    before_sampled = heldout_sampled(model.policy, reference, tok, val_records, reward_fn, **sampled)
    fingerprint = resume_fingerprint(params, inputs)
    lineage = {k: inputs[k] for k in ("policy", "reference", "reward_model", "data") if inputs.get(k)}

    with env.tracker(params, lineage) as run:
        run.set_tags({"device": str(device)})
        sample_prompts = [r["prompt"] for r in sample_records]

        def log_samples(m: PolicyAndValue, step: int) -> None:
            _, replies = heldout_metrics(m.policy, tok, sample_records, reward_fn, **gen)
            run.log_text("\n\n".join(f"> {p}\n{r}" for p, r in zip(sample_prompts, replies)),
                         f"samples/step_{step:06d}.txt")

        t0 = time.perf_counter()
        result = train(model, stage="ppo", cfg=tcfg, model_config={**mcfg, "value_model": section["value_model"]},
                       batch_fn=schedule.batch, loss_fn=loss_fn, eval_fn=eval_fn, ckpt_dir=env.ckpt_dir,
                       device=device, fingerprint=fingerprint, run=run, on_eval=log_samples)
        wall = time.perf_counter() - t0
        model.load_state_dict(final_weights(result, tcfg))
        model.eval()
        after, after_samples = heldout_metrics(model.policy, tok, val_records, reward_fn, **gen)
        after_sampled = heldout_sampled(model.policy, reference, tok, val_records, reward_fn, **sampled)
        kl_after = after_sampled["kl"]
        train_kl = [it["objective/kl"] for it in iterations]
        metrics = {
            "heldout": {"sft": before, "ppo": after, "n": len(val_records), "kl": kl_after,
                        "sampled": {"sft": before_sampled, "ppo": after_sampled}},
            "mean_train_kl": sum(train_kl) / len(train_kl) if train_kl else None,
            "final_kl_coef": model.kl.value, "n_prompts": len(prompts),
            "iterations": iterations, **run_summary(result, wall, device),
            "samples": [{"prompt": p, "sft": a, "ppo": b}
                        for p, a, b in zip(sample_prompts, before_samples, after_samples)],
        }
        publish(run, env, params, outputs, model.policy, kind="causal_lm", model_config=mcfg, tokenizer=tok,
                stage="ppo", step=result.step, metrics=metrics, base=inputs["policy"],
                final_metrics={**{f"heldout_{k}": v for k, v in after.items()},
                               **{f"sft_heldout_{k}": v for k, v in before.items()},
                               **{f"heldout_sampled_{k}": v for k, v in after_sampled.items()},
                               **{f"sft_heldout_sampled_{k}": v for k, v in before_sampled.items()}})
    print(f"ppo: done in {wall:.1f}s; held-out reward, greedy {before['reward']:.3f} -> {after['reward']:.3f}, "
          f"sampled {before_sampled['reward']:.3f} -> {after_sampled['reward']:.3f}; "
          f"KL to the reference {kl_after:.3f}")
    print(json.dumps(metrics["samples"], indent=1))
    return metrics
