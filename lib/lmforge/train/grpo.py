"""Group Relative Policy Optimization: group advantages, the clipped loss, rollouts with their extras.

GRPO (Shao et al. 2024, DeepSeekMath) drops PPO's value function: each prompt
is answered ``samples_per_prompt`` times and a response's advantage is its reward
relative to the other answers to the same prompt,

    A_i = (r_i - mean(r_group)) / scale,   scale = std(r_group) + 1e-4   (scale_rewards: group)
                                                   std(r_batch) + 1e-4   (batch)
                                                   1                     (none, Dr. GRPO)

the same for every token of response i. Per response token, with
``ratio = exp(logp - old_logp)``,

    loss_t = -min(ratio * A, clip(ratio, 1 - clip_range, 1 + clip_range_high) * A) + beta * k3_t
    k3_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (an unbiased, non-negative KL estimate)

and the per-token losses are averaged by ``loss_type``:

* ``grpo``: mean over each response's tokens, then over responses (long answers
  weigh less per token);
* ``dr_grpo``: sum over all tokens / (n_responses * max_new_tokens), a constant
  normaliser, so length earns no bias (Liu et al. 2025, "Understanding R1-Zero");
* ``dapo``: sum over all tokens / number of response tokens (Yu et al. 2025);
  with ``clip_range_high > clip_range`` that is DAPO's token-level loss and clip-higher.
  ``dapo_normalizer`` says which tokens: ``rollout`` (TRL's), the iteration's response
  tokens divided by its optimizer steps per pass, one constant for every mini-batch of
  the iteration, so each token weighs the same whatever mini-batch it lands in; or
  ``minibatch``, the mini-batch's own. Equal when an iteration is one mini-batch.

Batch terms. ``rollout_batch_size`` prompts are sampled per *iteration*, each
``samples_per_prompt`` times at ``temperature``; ``batch_size`` prompts (whole
groups, so group statistics stay meaningful) train one optimizer step (null:
all of them); ``ppo_epochs`` passes over the iteration's rollouts. One iteration
is ``ppo_epochs * rollout_batch_size / batch_size`` optimizer steps and
``max_steps`` counts optimizer steps. ``old_logp`` is the sampling policy's
log-prob, computed once per iteration; when an iteration is a single step the
policy has not moved yet, so it equals ``logp.detach()`` and is not computed.

Process supervision (DeepSeekMath, section 4.1.3). With ``step_reward`` w > 0,
each equation a response writes ("7 + 8 = 15") is a step rewarded 1 if it holds
and 0 if not; a group's step rewards are normalised together (minus their mean,
divided as ``scale_rewards`` says) and a token's process advantage is the sum of
the normalised rewards of the steps that end at or after it. A token's advantage
is then A_i + w * its process advantage: a wrong step is blamed on the tokens that
wrote it, not on the whole answer. Responses without equations get the outcome
advantage alone.

Dynamic sampling (DAPO). A group whose answers all score the same has advantage
0 and only costs compute; when correct answers are rare most groups are like
that. With ``oversample`` k > 1, up to k * rollout_batch_size prompts are sampled,
rollout_batch_size at a time, until rollout_batch_size groups with differing rewards are found,
and those are trained on (topped up with equal-reward groups if too few).
"""
from __future__ import annotations

from typing import Sequence

import torch

from lmforge.sections import GRPO_SCALE_REWARDS as SCALE_REWARDS
from lmforge.sections import GRPOConfig  # the grpo section: its knobs and rules
from lmforge.train.policy import CompletionBatch, completion_batch, masked_mean, token_logprobs
from lmforge.tasks import equation_steps
from lmforge.train.rollout import Rollout, sample_rollout

STD_EPS = 1e-4  # added to the std before dividing: a group whose rewards barely differ must not explode


# --------------------------------------------------------------------------- pure math


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Advantages (N,) of rewards (N,) laid out group by group (rows g*G .. g*G+G-1 answer prompt g).

    reward - its group's mean, divided by the group's std (``group``), the whole
    batch's std (``batch``) or nothing (``none``); stds are unbiased (n - 1), plus 1e-4.
    """
    grouped = rewards.float().view(-1, group_size)  # (n_prompts, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + STD_EPS)
    elif scale == "batch":
        centred = centred / (rewards.float().std() + STD_EPS)
    elif scale != "none":
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return centred.reshape(-1)


def process_advantages(steps: Sequence[Sequence[tuple[int, float]]], group_size: int, length: int,
                       scale: str = "group") -> torch.Tensor:
    """Per-token process advantages (N, length) from each response's steps, laid out group by group.

    steps[i]: (index of the response token that ends the step, its reward) in order.
    A group's step rewards r are normalised together, r~ = (r - mean) / scale with
    scale the std (unbiased, + 1e-4) of the group's step rewards (``group``), of the
    batch's (``batch``) or 1 (``none``); a group with fewer than two steps gets 0.
    Token t of response i gets the sum of r~ over its steps ending at or after t.
    """
    def step_rewards(rows) -> torch.Tensor:
        return torch.tensor([r for row in rows for _, r in row], dtype=torch.float)

    if scale not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale!r}")
    batch_div = step_rewards(steps).std() + STD_EPS if scale == "batch" else 1.0
    out = torch.zeros(len(steps), length)
    for g in range(0, len(steps), group_size):
        rewards = step_rewards(steps[g:g + group_size])
        if len(rewards) < 2:
            continue
        mean, div = rewards.mean(), rewards.std() + STD_EPS if scale == "group" else batch_div
        for i in range(g, min(g + group_size, len(steps))):
            for end, r in steps[i]:
                out[i, :end + 1] += (r - mean) / div
    return out


def response_steps(tok, response_ids: Sequence[int], text: str) -> list[tuple[int, float]]:
    """(index of the token that completes it, 1.0 if it holds else 0.0) for each equation of a response.

    text: the response as the rollout decoded it, its ids without ``<|end|>``.
    """
    ids = [t for t in response_ids if t != tok.end_id]
    steps = equation_steps(text)
    if not steps:
        return []
    ends = [len(tok.decode(ids[:k + 1])) for k in range(len(ids))]  # text length after each token
    return [(next(k for k, n in enumerate(ends) if n >= end), float(holds)) for end, holds in steps]


def group_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each row's group's reward std (unbiased), (N,): the spread the advantage is measured against."""
    return rewards.float().view(-1, group_size).std(dim=1).repeat_interleave(group_size)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference), same shape as the inputs, >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *,
                      epsilon: float, epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token, as a loss.

    logp, old_logp: (B, T); advantages: (B,) broadcast over each row's tokens, or (B, T) per token.
    Returns (loss (B, T), low_clipped (B, T) bool, high_clipped (B, T) bool): a token
    is clipped where the clipped term is the one ``min`` picks and carries no gradient
    (ratio below 1 - epsilon with A < 0, or above 1 + epsilon_high with A > 0).
    """
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    return loss, low, high


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int,
              dapo_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Reduce per-token losses (B, T) over response tokens (mask (B, T) 0/1) to a scalar; see the module doc.

    ``dapo_tokens``: dapo's divisor (default: the mask's own token count).
    """
    if loss_type == "grpo":
        return masked_mean(per_token, mask, dim=1).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * max_new_tokens)
    if loss_type == "dapo":
        divisor = mask.sum() if dapo_tokens is None else torch.as_tensor(dapo_tokens, dtype=mask.dtype)
        return (per_token * mask).sum() / divisor.clamp(min=1)
    raise ValueError(f"unknown loss_type {loss_type!r}")


# --------------------------------------------------------------------------- rollouts


@torch.no_grad()
def chunked_logprobs(model, batch: CompletionBatch, *, temperature: float, chunk: int) -> torch.Tensor:
    """token_logprobs (N, T-1) of a frozen pass (reference, or the sampling policy), ``chunk`` rows at a time."""
    was_training = model.training
    model.eval()
    try:
        parts = []
        for s in range(0, len(batch), chunk):
            rows = CompletionBatch(batch.input_ids[s:s + chunk], batch.key_padding_mask[s:s + chunk],
                                   batch.response_mask[s:s + chunk])
            parts.append(token_logprobs(model, rows, temperature=temperature))
    finally:
        model.train(was_training)
    return torch.cat(parts)


def informative_groups(rewards: torch.Tensor, group_size: int, n_keep: int) -> list[int]:
    """Indices of ``n_keep`` groups (rewards (N,) laid out group by group), in ascending order:
    those whose rewards differ first (a group of equal rewards has advantage 0 and teaches nothing),
    then equal-reward groups to fill up."""
    spread = rewards.float().view(-1, group_size).std(dim=1) > 0
    order = [g for g in range(len(spread)) if spread[g]] + [g for g in range(len(spread)) if not spread[g]]
    return sorted(order[:n_keep])


def make_rollout(policy, tok, records: Sequence[dict], cfg: GRPOConfig, reward_fn, *, reference=None,
                 generator: torch.Generator | None = None, device=None) -> tuple[Rollout, dict]:
    """Sample ``samples_per_prompt`` answers per prompt, score them, keep ``rollout_batch_size`` groups,
    attach what the loss needs.

    records: ``rollout_batch_size * oversample`` prompts. They are sampled ``rollout_batch_size``
    at a time until ``rollout_batch_size`` groups with differing rewards are found or the
    records run out (DAPO's dynamic sampling; with oversample 1 one round, all kept).
    ``extra`` of the kept rows (N = rollout_batch_size * samples_per_prompt): advantages, rewards,
    correct (nan where no reference answer), group_std, truncated (1: hit
    max_new_tokens), all (N,); ref_logps (N, T-1) when a reference is given;
    old_logps (N, T-1) when an iteration takes more than one optimizer step.
    Also returns statistics of everything sampled (before the selection).
    """
    G, B = cfg.samples_per_prompt, cfg.rollout_batch_size
    rows = {"records": [], "prompt_ids": [], "response_ids": [], "responses": [], "finished": [], "rewards": [],
            "correct": []}
    for start in range(0, len(records), B):
        ro = sample_rollout(policy, tok, records[start:start + B], n_per_prompt=G, max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator)
        scored = reward_fn(ro.records, ro.responses, ro.response_ids)
        correct = scored.correct if scored.correct is not None else torch.full((len(ro),), float("nan"))
        for name, values in (("records", ro.records), ("prompt_ids", ro.prompt_ids),
                             ("response_ids", ro.response_ids), ("responses", ro.responses),
                             ("finished", ro.finished.tolist()), ("rewards", scored.reward.float().tolist()),
                             ("correct", correct.float().tolist())):
            rows[name] += list(values)
        n_spread = int((torch.tensor(rows["rewards"]).view(-1, G).std(dim=1) > 0).sum())
        if n_spread >= B:
            break
    sampled = torch.tensor(rows["rewards"])
    stats = {"rollout/reward": sampled.mean().item(),
             "rollout/frac_reward_zero_std": 1 - n_spread / (len(sampled) // G),
             "rollout/prompts": len(sampled) // G}
    if not torch.isnan(torch.tensor(rows["correct"])).all():
        stats["rollout/accuracy"] = torch.tensor(rows["correct"]).nanmean().item()
    keep = [g * G + j for g in informative_groups(sampled, G, B) for j in range(G)]
    pick = {name: [values[i] for i in keep] for name, values in rows.items()}
    ro = Rollout(records=pick["records"], prompt_ids=pick["prompt_ids"], response_ids=pick["response_ids"],
                 responses=pick["responses"], finished=torch.tensor(pick["finished"], dtype=torch.bool),
                 batch=completion_batch(pick["prompt_ids"], pick["response_ids"], tok.pad_id, device=device))
    rewards = torch.tensor(pick["rewards"])
    advantages = group_advantages(rewards, G, cfg.scale_rewards)
    if cfg.step_reward > 0:
        steps = [response_steps(tok, ids, text) for ids, text in zip(ro.response_ids, ro.responses)]
        advantages = token_advantages(advantages, steps, ro, cfg)
        held = [r for row in steps for _, r in row]
        stats["rollout/step_accuracy"] = sum(held) / len(held) if held else float("nan")
    extra = {"advantages": advantages, "rewards": rewards,
             "correct": torch.tensor(pick["correct"]), "group_std": group_std(rewards, G),
             "truncated": (~ro.finished).float(),
             # dapo's divisor under dapo_normalizer: rollout, the same on every row
             "rollout_tokens": torch.full((len(ro),), float(ro.batch.response_mask.sum()))}
    chunk = cfg.batch_size * G
    if reference is not None:
        extra["ref_logps"] = chunked_logprobs(reference, ro.batch, temperature=cfg.temperature, chunk=chunk)
    if cfg.steps_per_iteration > 1:
        extra["old_logps"] = chunked_logprobs(policy, ro.batch, temperature=cfg.temperature, chunk=chunk)
    ro.extra = {k: v.to(ro.batch.input_ids.device) for k, v in extra.items()}
    return ro, stats


def token_advantages(outcome: torch.Tensor, steps: Sequence[Sequence[tuple[int, float]]], ro: Rollout,
                     cfg: GRPOConfig) -> torch.Tensor:
    """(N, T-1) advantages over the rollout batch's target positions: outcome + step_reward * process,
    from each row's outcome advantage (N,) and its steps (``response_steps``)."""
    process = process_advantages(steps, cfg.samples_per_prompt, max(len(ids) for ids in ro.response_ids),
                                 cfg.scale_rewards)
    mask = ro.batch.response_mask.bool()  # each row's response tokens, in order, where completion_batch put them
    out = outcome[:, None].to(torch.float).repeat(1, mask.shape[1])
    out[mask] += cfg.step_reward * torch.cat([process[i, :len(ids)] for i, ids in enumerate(ro.response_ids)])
    return out


# --------------------------------------------------------------------------- loss


def grpo_loss(model, batch: dict, cfg: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """The loop's loss_fn: batch is a ``RolloutSchedule.batch`` dict (whole groups)."""
    cb: CompletionBatch = batch["batch"]
    mask = cb.response_mask
    logp = token_logprobs(model, cb, temperature=cfg.temperature)
    old = batch["old_logps"] if "old_logps" in batch else logp.detach()
    per_token, low, high = clipped_surrogate(logp, old, batch["advantages"], epsilon=cfg.clip_range,
                                             epsilon_high=cfg.clip_range_high)
    metrics = {}
    if cfg.beta > 0:
        kl = k3_kl(logp, batch["ref_logps"])
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask).item()
    dapo_tokens = None
    if cfg.loss_type == "dapo" and cfg.dapo_normalizer == "rollout" and cfg.n_minibatches > 1:
        dapo_tokens = batch["rollout_tokens"][0] / cfg.n_minibatches
    loss = aggregate(per_token, mask, cfg.loss_type, cfg.max_new_tokens, dapo_tokens)
    low, high = low.float(), high.float()
    metrics.update(rollout_metrics(batch, cfg.samples_per_prompt))
    metrics.update({"clip_ratio": masked_mean(low + high, mask).item(), "clip_ratio/low": masked_mean(low, mask).item(),
                    "clip_ratio/high": masked_mean(high, mask).item(),
                    "completions/mean_length": mask.sum(1).mean().item(),
                    "tokens": float(cb.key_padding_mask.sum())})
    return loss, metrics


def rollout_metrics(batch: dict, group_size: int) -> dict:
    """Reward statistics of a mini-batch's rows (TRL's names where it has one)."""
    rewards, stds = batch["rewards"], batch["group_std"]
    out = {"reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
           "reward_group_std": stds.mean().item(), "frac_reward_zero_std": (stds == 0).float().mean().item(),
           "completions/clipped_ratio": batch["truncated"].mean().item()}
    correct = batch["correct"]
    if not torch.isnan(correct).all():
        out["accuracy"] = correct.nanmean().item()
    return out
