"""PPO for language models: per-token KL-penalised rewards, GAE, clipped policy and value losses.

The recipe is Ziegler et al. 2019 / Ouyang et al. 2022 as TRL implements it.

Sizes. ``rollout_batch_size`` prompts (one sampled response each: a *rollout*) make
one PPO *iteration*; ``batch_size`` rollouts make one optimizer step; an
iteration is ``ppo_epochs * rollout_batch_size / batch_size`` optimizer steps and
``max_steps`` counts optimizer steps (``lmforge.train.rollout.RolloutSchedule``
maps a step to its iteration, epoch and mini-batch).

Per iteration (``prepare_rollout``), with no gradients, on the response tokens
of every row (the target positions of ``CompletionBatch.response_mask``):

* ``old_logp`` of the policy and ``ref_logp`` of the frozen reference, both at the
  sampling temperature, and the critic's values ``V_t`` of the state before token t;
* the per-token KL estimate ``kl_t``: k1 = ``logp - ref_logp`` (unbiased, can be
  negative) or k3 = ``exp(ref_logp - logp) - (ref_logp - logp) - 1`` (>= 0);
* the per-token reward ``r_t = -kl_coef * kl_t``, plus the sequence score (the reward
  function minus ``missing_eos_penalty`` for a response that never emitted
  ``<|end|>``) where ``score_position`` puts it: ``last_token``, on the last response
  token with V = 0 after it (TRL 0.11's v1 ``PPOTrainer``), or ``after_eos``, one step
  past ``<|end|>``, a state the critic values and learns too (TRL's later trainer,
  ``PPOv2Trainer`` in 0.11, ``trl.experimental.ppo`` since; an unfinished response gets
  it on its last token); optionally scaled by its std (``whiten_rewards``);
* GAE: ``delta_t = r_t + gamma V_{t+1} - V_t`` (V = 0 past the last valued step),
  ``A_t = delta_t + gamma lambda A_{t+1}``; returns ``R_t = A_t + V_t``; advantages
  then whitened over all response tokens of the iteration (``whiten_advantages``).
  Whitening divides by the unbiased (n - 1) std, as TRL's ``masked_whiten``.

Per mini-batch (``ppo_loss``), with ``rho = exp(logp - old_logp)``:

* policy: ``mean_t max(-A_t rho, -A_t clip(rho, 1 - eps, 1 + eps))``;
* value: ``0.5 mean_t max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)``;
* loss = policy + ``vf_coef`` * value (means over response tokens of the mini-batch).

The critic (``PolicyAndValue``) is either ``separate`` (default): a ``ValueModel``
with its own trunk, initialised from the SFT weights, so the value loss cannot
disturb the policy's features, at the cost of a second trunk; or ``shared``: a
value head on the policy's own last hidden states, half the memory and one
forward pass, but the value gradients move the policy's trunk too.

The KL coefficient is fixed (``kl_target: null``) or adapted once per iteration
(Ziegler et al.): ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon``,
n = rollouts per iteration, kl = the iteration's mean sequence KL. Its state
lives in buffers of ``PolicyAndValue`` so the loop's checkpoint carries it and a
resumed run continues with the same coefficient.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.model import Transformer, ValueModel
from lmforge.sections import PPOConfig, TrainConfig
from lmforge.train.policy import CompletionBatch, masked_mean, token_logprobs
from lmforge.train.rollout import Rollout

KL_ESTIMATORS = ("k1", "k3")
VALUE_MODELS = ("separate", "shared")


# --------------------------------------------------------------------------- settings


@dataclass
class PPOSettings:
    """The PPO-specific knobs of a ``ppo`` config section (see config.schema.yaml)."""

    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_target: float | None = None
    kl_horizon: int = 10000
    gamma: float = 1.0
    gae_lambda: float = 0.95
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    temperature: float = 1.0
    missing_eos_penalty: float = 1.0
    score_position: str = "last_token"

    @classmethod
    def from_section(cls, section: dict) -> "PPOSettings":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in section.items() if k in names})


def train_config(section: dict, key: str = "ppo") -> tuple[TrainConfig, int]:
    """(the loop's TrainConfig, optimizer steps per pass over an iteration's rollouts).

    The loop's optimizer step is one forward-backward pass of ``batch_size`` rollouts;
    ``batch_size`` must divide ``rollout_batch_size`` (``lmforge.sections.PPOConfig``).
    """
    cfg = PPOConfig.from_dict(section, key)
    return TrainConfig.from_dict({**section, "batch_size": cfg.batch_size}, key=key), cfg.n_minibatches


# --------------------------------------------------------------------------- pure pieces


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens' log-probs, (B, T) -> (B, T).

    k1 = log p - log q (unbiased, high variance, can be negative);
    k3 = (q/p - 1) - log(q/p) (unbiased, always >= 0; Schulman 2020).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = ref_logp - logp
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) float mask -> (B, T) with a 1 at each row's last masked position only."""
    T = mask.shape[1]
    last = T - 1 - mask.flip(-1).argmax(-1)
    out = torch.zeros_like(mask)
    rows = mask.sum(-1) > 0
    out[rows.nonzero().squeeze(-1), last[rows]] = 1.0
    return out


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                  score_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token rewards (B, T): ``-kl_coef * kl`` on response tokens, plus ``scores`` (B,) where
    ``score_mask`` is 1 (default: each row's last response token)."""
    if score_mask is None:
        return (-kl_coef * kl + scores[:, None] * last_token_mask(mask)) * mask
    return -kl_coef * kl * mask + scores[:, None] * score_mask


def one_step_past(batch: CompletionBatch) -> CompletionBatch:
    """The batch with one more column and each row's first padding token marked real, so that the
    target axis has a step after every response's last token: the state after ``<|end|>``, which
    the critic values at that token. (Causal attention: the extra token changes no earlier output;
    ``Rollout.select`` keeps it when it trims padding.)"""
    pad = torch.zeros_like(batch.input_ids[:, :1])
    real = torch.cat([batch.key_padding_mask, torch.zeros_like(pad, dtype=torch.bool)], 1)
    real[torch.arange(len(real), device=real.device), batch.key_padding_mask.sum(1)] = True
    return CompletionBatch(torch.cat([batch.input_ids, pad], 1), real,
                           torch.cat([batch.response_mask, torch.zeros_like(batch.response_mask[:, :1])], 1))


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked positions (mean kept when not ``shift_mean``); zeros elsewhere. (B, T).

    The variance is unbiased, ``n / (n - 1)`` times the mean squared deviation, as TRL's ``masked_var``.
    """
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's response positions.

    rewards, values, mask: (B, T); a row's masked positions are one contiguous
    span (its response) and the value after its last token is 0 (terminal).
    Returns (advantages, returns), both (B, T), zero outside the mask.
    """
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        # Beyond a response's last token the next state is terminal: no bootstrap, no carry.
        cont = mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * cont * next_value - values[:, t]
        running = delta + gamma * lam * cont * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, a mean over masked tokens; all inputs (B, T).

    Returns (loss, {"policy/clipfrac": share of tokens where the clipped term won,
    "policy/approxkl_token": 0.5 * mean over masked tokens of (logp - old_logp)^2}).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "policy/approxkl_token": 0.5 * masked_mean(log_ratio ** 2, mask).item()}
    return loss, stats


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip_range_value: float) -> tuple[torch.Tensor, dict]:
    """0.5 * mean over masked tokens of max((V - R)^2, (clip(V, V_old +- eps) - R)^2); inputs (B, T).

    Returns (loss, {"val/clipfrac": share of tokens where the clipped term won}).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"val/clipfrac": masked_mean((clipped > unclipped).float(), mask).item()}
    return loss, stats


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(target - predicted) / Var(target) over masked positions (1: perfect; <= 0: no better than a constant)."""
    var_target = masked_mean((target - masked_mean(target, mask)) ** 2, mask)
    residual = target - predicted
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return (1.0 - var_residual / var_target.clamp(min=1e-12)).item()


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, n: int) -> float:
    """Ziegler et al.'s proportional controller: ``coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)``."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n / horizon)


# --------------------------------------------------------------------------- modules


class KLController(nn.Module):
    """The KL coefficient of each iteration, fixed or adaptive, its state in buffers (checkpointed with the model).

    ``coef_for(i)`` gives iteration i's coefficient; when adaptive and i is a new
    iteration, it first applies the update from the KL that ``observe`` recorded
    for the previous one. A resumed run that samples an interrupted iteration
    again gets that iteration's coefficient, not one updated twice.
    """

    def __init__(self, kl_coef: float, target: float | None = None, horizon: int = 10000, n: int = 1):
        super().__init__()
        self.init_coef, self.target, self.horizon, self.n = float(kl_coef), target, horizon, n
        self.register_buffer("coef", torch.tensor(float(kl_coef)))
        self.register_buffer("iteration", torch.tensor(0))  # the iteration ``coef`` belongs to
        self.register_buffer("last_kl", torch.tensor(0.0))
        self.register_buffer("observed", torch.tensor(False))  # last_kl measured with ``coef``, not yet applied

    @property
    def value(self) -> float:
        """The current coefficient."""
        return self.init_coef if self.target is None else float(self.coef)

    def coef_for(self, iteration: int) -> float:
        if self.target is None:
            return self.init_coef
        if iteration > int(self.iteration) and bool(self.observed):
            self.coef.fill_(adaptive_kl_coef(float(self.coef), float(self.last_kl), self.target, self.horizon,
                                             self.n))
            self.observed.fill_(False)
        self.iteration.fill_(max(iteration, int(self.iteration)))
        return float(self.coef)

    def observe(self, iteration: int, kl: float) -> None:
        self.last_kl.fill_(kl)
        self.observed.fill_(True)


class PolicyAndValue(nn.Module):
    """The trainable parts of PPO as one module for the loop's optimizer: the policy, the critic, the KL state.

    value_model ``separate``: ``self.value`` is a ValueModel on a copy of the
    policy's initial weights; ``shared``: ``self.value_head`` reads the policy's
    own hidden states. Dropout is switched off: the ratio must compare the same
    deterministic function at sampling and update time.
    """

    def __init__(self, policy: Transformer, *, value_model: str = "separate", kl: KLController | None = None):
        super().__init__()
        if value_model not in VALUE_MODELS:
            raise ValueError(f"value_model must be one of {VALUE_MODELS}, got {value_model!r}")
        self.policy, self.value_model = policy, value_model
        if value_model == "separate":
            self.value = ValueModel(copy.deepcopy(policy))
        else:
            self.value_head = nn.Linear(policy.cfg.d_model, 1)
            Transformer._init_module(self.value_head)
        self.kl = kl if kl is not None else KLController(0.0)
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0

    def forward(self, batch: CompletionBatch, temperature: float = 1.0,
                return_entropy: bool = False) -> tuple[torch.Tensor, ...]:
        """(logp (B, T-1), values (B, T-1)[, entropy (B, T-1)]) on the target axis.

        values[:, t] is the critic's value of the prefix ending at position t, i.e.
        of the state in which target token t+1 is chosen.
        """
        if self.value_model == "separate":
            out = token_logprobs(self.policy, batch, temperature=temperature, return_entropy=return_entropy)
            values = self.value(batch.input_ids, batch.key_padding_mask)
        else:
            # One trunk pass feeds both heads; token_logprobs gets the logits through a stand-in model.
            h = self.policy.hidden_states(batch.input_ids, key_padding_mask=batch.key_padding_mask)
            logits = self.policy.lm_head(h)
            out = token_logprobs(lambda *_, **__: logits, batch, temperature=temperature,
                                 return_entropy=return_entropy)
            values = self.value_head(h).squeeze(-1)
        values = values[:, :-1].float()
        return (*out, values) if return_entropy else (out, values)


# --------------------------------------------------------------------------- rollouts and loss


def sequence_scores(reward: torch.Tensor, finished: torch.Tensor, missing_eos_penalty: float) -> torch.Tensor:
    """What PPO maximises per response (N,): the reward minus the penalty where no ``<|end|>`` was emitted."""
    return reward - missing_eos_penalty * (~finished).float()


@torch.no_grad()
def prepare_rollout(model: PolicyAndValue, reference: nn.Module, rollout: Rollout, scores: torch.Tensor, *,
                    kl_coef: float, s: PPOSettings) -> dict:
    """Fill ``rollout.extra`` with old_logp, old_values, advantages, returns, value_mask (B, T-1) and
    response_width (B,).

    scores: (B,) sequence scores (``sequence_scores``). With ``score_position: after_eos``
    the rollout's batch gains one padding column (``one_step_past``) and ``value_mask`` the
    step after each finished response's ``<|end|>``. Returns the iteration's statistics
    (TRL names and meanings): objective/kl (mean sequence KL), objective/entropy (mean over
    responses of the summed -log p of their sampled tokens), objective/entropy_token (mean
    per-token entropy of the policy's distributions), objective/non_score_reward,
    objective/rlhf_reward, val/vf_explained_var (old values vs returns), env/response_length.
    """
    if s.score_position == "after_eos":
        rollout.batch = one_step_past(rollout.batch)
    batch = rollout.batch
    mask = batch.response_mask
    old_logp, entropy, old_values = model(batch, s.temperature, return_entropy=True)
    ref_logp = token_logprobs(reference, batch, temperature=s.temperature)
    kl = kl_estimate(old_logp, ref_logp, s.kl_estimator) * mask
    scores = scores.to(mask.device, torch.float)
    if s.score_position == "after_eos":
        finished = rollout.finished.to(mask.device)[:, None].float()
        last = last_token_mask(mask)
        after = last.roll(1, dims=1) * finished  # one_step_past left room: no row wraps around
        value_mask = mask + after
        rewards = token_rewards(scores, kl, mask, kl_coef, score_mask=last * (1 - finished) + after)
    else:
        value_mask = mask
        rewards = token_rewards(scores, kl, mask, kl_coef)
    if s.whiten_rewards:
        rewards = whiten(rewards, value_mask, shift_mean=False)
    old_values = old_values * value_mask
    advantages, returns = gae(rewards, old_values, value_mask, s.gamma, s.gae_lambda)
    if s.whiten_advantages:
        advantages = whiten(advantages, mask)
    kl_seq = kl.sum(-1)
    lengths = mask.sum(-1)
    rollout.extra.update(old_logp=old_logp, old_values=old_values, advantages=advantages, returns=returns,
                         value_mask=value_mask, response_width=torch.full_like(lengths, lengths.max().item()))
    non_score = (-kl_coef * kl_seq).mean().item()
    return {"objective/kl": kl_seq.mean().item(), "objective/entropy": (-old_logp * mask).sum(-1).mean().item(),
            "objective/entropy_token": masked_mean(entropy, mask).item(),
            "objective/non_score_reward": non_score, "objective/rlhf_reward": scores.mean().item() + non_score,
            "objective/scores": scores.mean().item(),
            "val/vf_explained_var": explained_variance(old_values, returns, value_mask),
            "env/response_length": lengths.mean().item(), "kl_coef": kl_coef}


def ppo_loss(model: PolicyAndValue, batch: dict, *, s: PPOSettings) -> tuple[torch.Tensor, dict]:
    """Clipped policy loss + vf_coef * clipped value loss on a mini-batch from ``Rollout.select``.

    ``policy/approxkl`` is TRL's: 0.5 (logp - old_logp)^2 averaged over rows x the rollout's
    longest response, padding included (``policy/approxkl_token``: over response tokens only).
    """
    cb: CompletionBatch = batch["batch"]
    mask = cb.response_mask
    value_mask = batch.get("value_mask", mask)
    logp, values = model(cb, s.temperature)
    pg_loss, pg_stats = clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, s.clip_range)
    vf_loss, vf_stats = clipped_value_loss(values, batch["old_values"], batch["returns"], value_mask,
                                           s.clip_range_value)
    loss = pg_loss + s.vf_coef * vf_loss
    with torch.no_grad():
        squared = ((logp - batch["old_logp"]) ** 2 * mask).sum()
        width = batch["response_width"][0] if "response_width" in batch else mask.sum(-1).max()
        approxkl = 0.5 * (squared / (len(cb) * width.clamp(min=1))).item()
    return loss, {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(), **pg_stats, **vf_stats,
                  "policy/approxkl": approxkl, "tokens": float(cb.key_padding_mask.sum())}
