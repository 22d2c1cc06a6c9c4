"""Direct preference optimisation: the losses, the frozen reference's cached log-probs, batches, metrics.

DPO (Rafailov et al. 2023) trains the policy directly on preference pairs.
With ``h = (log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))``,
the log-probabilities summed over each response's tokens, a pair's loss is

* ``sigmoid``: ``-(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)``; ``ls``
  (label smoothing) > 0 is conservative DPO, for labels flipped with probability ls;
* ``ipo``: ``(h' - 1 / (2 beta))^2`` (Azar et al. 2023), with ``h'`` the gap of the
  log-ratios each divided by its response's length (TRL's form, which the IPO authors
  confirmed): it stops pushing once the gap reaches its target instead of driving it to infinity;
* ``hinge``: ``relu(1 - beta h)`` (the SLiC loss).

Two losses need no reference model at all (``REFERENCE_FREE``; no reference is
loaded or run), and compare the policy's own per-token mean log-probs
``a = log p(response) / its length``:

* ``simpo``: ``-(1 - ls) log sigmoid(beta (a_c - a_r) - gamma) - ls log sigmoid(...)``,
  ``gamma = simpo_gamma_beta_ratio * beta`` the target margin (Meng et al. 2024; TRL's
  CPO ``loss_type="simpo"``);
* ``orpo``: ``-orpo_lambda log sigmoid(log odds(a_c) - log odds(a_r))``, odds(a) =
  e^a / (1 - e^a), plus the chosen answers' NLL (Hong et al. 2024; TRL's ORPO, whose
  NLL also covers the prompt tokens; here it covers the chosen responses only, as the paper's).

``rpo_alpha`` > 0 adds ``rpo_alpha`` times the chosen responses' negative log-likelihood,
one mean over all their tokens (RPO, Pang et al. 2024; TRL's ``loss_type=["sigmoid", "sft"]``,
``loss_weights=[1, rpo_alpha]``): DPO alone can lower the likelihood of the chosen answers
too, and the freed mass then goes to responses no pair shows (an empty answer, say); the
NLL term holds it on them.

The reference is frozen, so its log-probs of every pair are computed once
before training (``reference_logprobs``) and carried in each batch: the
reference never runs during training. ``beta * (log p - log p_ref)`` is the
implicit reward of a response (``beta * a`` for the reference-free losses, as TRL
logs them); the metrics use TRL's names for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from lmforge.device import autocast
from lmforge.errors import LmforgeError
from lmforge.train.policy import CompletionBatch, completion_batch, sequence_logprobs
from lmforge.train.reward import encode_pairs
from lmforge.train.sft import epoch_order

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")  # losses of the policy alone: no reference model is loaded or run


# --------------------------------------------------------------------------- losses (pure)


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss, (B,), from log-ratio gaps h (B,); label smoothing gives conservative DPO."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair IPO loss, (B,): squared distance of the (per-token) log-ratio gap h from its target 1 / (2 beta)."""
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair hinge (SLiC) loss, (B,)."""
    return F.relu(1 - beta * h)


def simpo_loss(mean_c: torch.Tensor, mean_r: torch.Tensor, beta: float, gamma_beta_ratio: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair SimPO loss, (B,), from the policy's per-token mean log-probs; target margin gamma = ratio * beta."""
    return sigmoid_loss(mean_c - mean_r - gamma_beta_ratio, beta, label_smoothing)


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(mean_logp) < 1, computed without cancellation near p = 1 or p = 0."""
    x = mean_logp.float()
    log1m_p = torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
    return x - log1m_p


def orpo_loss(mean_c: torch.Tensor, mean_r: torch.Tensor, orpo_lambda: float) -> torch.Tensor:
    """Per-pair odds-ratio term of ORPO, (B,): -lambda log sigmoid(log odds(chosen) - log odds(rejected))."""
    return -orpo_lambda * F.logsigmoid(log_odds(mean_c) - log_odds(mean_r))


def preference_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, *, beta: float,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None,
                    simpo_gamma_beta_ratio: float = 0.5, orpo_lambda: float = 0.1) -> torch.Tensor:
    """Per-pair loss (B,) from log p - log p_ref of the chosen and rejected responses, each (B,).

    For the reference-free losses the log-ratios are the policy's log p alone (log p_ref = 0).
    ``chosen_len``/``rejected_len`` (B,): response lengths in tokens, needed by ipo, simpo and orpo.
    """
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        return sigmoid_loss(h, beta, label_smoothing)
    if loss_type == "hinge":
        return hinge_loss(h, beta)
    if loss_type not in LOSS_TYPES:
        raise LmforgeError(f"config key 'dpo.loss_type': {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if chosen_len is None or rejected_len is None:
        raise ValueError(f"loss_type {loss_type!r} needs the responses' lengths (chosen_len, rejected_len)")
    mean_c = chosen_logratio / chosen_len.clamp(min=1)
    mean_r = rejected_logratio / rejected_len.clamp(min=1)
    if loss_type == "ipo":
        return ipo_loss(mean_c - mean_r, beta)
    if loss_type == "simpo":
        return simpo_loss(mean_c, mean_r, beta, simpo_gamma_beta_ratio, label_smoothing)
    return orpo_loss(mean_c, mean_r, orpo_lambda)


@torch.no_grad()
def dpo_metrics(logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                beta: float) -> dict:
    """TRL's per-batch numbers: implicit rewards beta * (log p - log p_ref), their margin and accuracy
    (chosen reward above rejected; a tie counts as wrong), and the policy's mean log-probs. Inputs (B,)."""
    r_c, r_r = beta * (logp_c - ref_c), beta * (logp_r - ref_r)
    return {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
            "rewards/margins": (r_c - r_r).mean().item(), "rewards/accuracies": (r_c > r_r).float().mean().item(),
            "logps/chosen": logp_c.mean().item(), "logps/rejected": logp_r.mean().item()}


def pair_metrics(logp_c, logp_r, ref_c, ref_r, len_c, len_r, *, beta: float, loss_type: str) -> dict:
    """``dpo_metrics`` as TRL logs them for the loss type: the reference-free losses (TRL's CPO/SimPO and
    ORPO) report per-token mean log-probs, their rewards ``beta`` times those."""
    if loss_type in REFERENCE_FREE:
        zero = torch.zeros_like(logp_c)
        return dpo_metrics(logp_c / len_c.clamp(min=1), logp_r / len_r.clamp(min=1), zero, zero, beta)
    return dpo_metrics(logp_c, logp_r, ref_c, ref_r, beta)


# --------------------------------------------------------------------------- encoding


@dataclass
class DPOExample:
    """A pair as token ids: the rendered prompt and each response (``<|end|>`` included unless cut)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    truncated: bool = False


def encode_dpo_pairs(tok, pairs: Sequence[dict], max_seq_len: int) -> list[DPOExample]:
    """Prompt + response ids of each pair, as ``train.reward.encode_pairs`` renders and cuts them
    (a prompt that leaves no room for a response is an error naming the pair)."""
    examples = encode_pairs(tok, pairs, max_seq_len)
    out = []
    for pair, ex in zip(pairs, examples):
        n = len(tok.render_prompt(pair["prompt"]))
        out.append(DPOExample(ex.chosen[:n], ex.chosen[n:], ex.rejected[n:], ex.truncated))
    return out


def pair_completions(examples: Sequence[DPOExample], pad_id: int, device=None) -> CompletionBatch:
    """Chosen rows then rejected rows: a ``CompletionBatch`` of 2B right-padded rows."""
    prompts = [e.prompt for e in examples] * 2
    responses = [e.chosen for e in examples] + [e.rejected for e in examples]
    return completion_batch(prompts, responses, pad_id, device)


def pair_logprobs(model, completions: CompletionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(chosen | prompt), log p(rejected | prompt)), each (B,), from one forward over 2B rows."""
    return sequence_logprobs(model, completions).chunk(2)


@torch.no_grad()
def reference_logprobs(model, examples: Sequence[DPOExample], *, batch_size: int, pad_id: int,
                       device=None, only: Iterable[int] | None = None) -> torch.Tensor:
    """The frozen reference's log-probs of the pairs, (N, 2) float32 [chosen, rejected], one pass.

    The table is indexed by pair, in ``examples`` order. ``only``: the indices a run
    will read (``DPOBatches.needed``); the other rows are NaN, so a read of one
    shows. A pair that occurs several times (on-policy pairs repeated into a
    mix) is computed once. Pairs are grouped by length so a batch carries little
    padding.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else torch.device("cpu")
    table = torch.full((len(examples), 2), float("nan"), dtype=torch.float32)
    copies: dict[tuple, list[int]] = {}
    for i in sorted(set(range(len(examples)) if only is None else only)):
        e = examples[i]
        copies.setdefault((tuple(e.prompt), tuple(e.chosen), tuple(e.rejected)), []).append(i)
    order = sorted(copies.values(), key=lambda c: len(examples[c[0]].prompt) + max(
        len(examples[c[0]].chosen), len(examples[c[0]].rejected)))
    for s in range(0, len(order), batch_size):
        groups = order[s:s + batch_size]
        with autocast(device):
            logp_c, logp_r = pair_logprobs(model, pair_completions([examples[g[0]] for g in groups], pad_id, device))
        rows = torch.stack([logp_c, logp_r], dim=1).float().cpu()
        for row, group in zip(rows, groups):
            table[group] = row
    model.train(was_training)
    return table


# --------------------------------------------------------------------------- batches


class DPOBatches:
    """Seeded per-epoch shuffled pair batches with their cached reference log-probs.

    ``batch(step, micro)`` is a pure function of its arguments (what exact resume
    needs): ``{"completions": CompletionBatch (2B rows), "ref_chosen": (B,),
    "ref_rejected": (B,), "index": (B,) pair indices}``.
    """

    def __init__(self, examples: Sequence[DPOExample], ref_logps: torch.Tensor | None, *, batch_size: int,
                 pad_id: int, seed: int, grad_accum_steps: int = 1, device=None):
        if not examples:
            raise ValueError("DPOBatches needs at least one pair")
        self.examples, self.pad_id, self.seed = list(examples), pad_id, seed
        self.accum, self.device = grad_accum_steps, device
        self.ref: torch.Tensor | None = None
        if ref_logps is not None:  # else set_reference, once `needed` has said which pairs to score
            self.set_reference(ref_logps)
        self.batch_size = min(batch_size, len(self.examples))
        self.per_epoch = len(self.examples) // self.batch_size
        self._order: tuple[int, list[int]] | None = None

    def needed(self, steps: int, eval_limit: int | None = None) -> set[int]:
        """The pair indices that ``steps`` optimizer steps and ``eval_batches(eval_limit)`` read."""
        drawn = {i for step in range(steps) for micro in range(self.accum) for i in self._indices(step, micro)}
        return drawn | {i for batch in self._eval_indices(eval_limit) for i in batch}

    def set_reference(self, ref_logps: torch.Tensor) -> None:
        if ref_logps.shape != (len(self.examples), 2):
            raise ValueError(f"ref_logps must be ({len(self.examples)}, 2), got {tuple(ref_logps.shape)}")
        self.ref = ref_logps

    def make(self, indices: Sequence[int]) -> dict:
        if self.ref is None:
            raise ValueError("DPOBatches: no reference log-probs yet (set_reference)")
        index = torch.tensor(list(indices), dtype=torch.long)
        ref = self.ref[index].to(self.device) if self.device is not None else self.ref[index]
        return {"completions": pair_completions([self.examples[i] for i in indices], self.pad_id, self.device),
                "ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1], "index": index}

    def batch(self, step: int, micro: int = 0) -> dict:
        return self.make(self._indices(step, micro))

    def _indices(self, step: int, micro: int) -> list[int]:
        epoch, k = divmod(step * self.accum + micro, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.examples), self.seed, epoch))
        return self._order[1][k * self.batch_size:(k + 1) * self.batch_size]

    def eval_batches(self, limit: int | None = None) -> Iterator[dict]:
        """Every pair in data order (or the first ``limit`` batches)."""
        for indices in self._eval_indices(limit):
            yield self.make(indices)

    def _eval_indices(self, limit: int | None) -> list[range]:
        n = len(self.examples)
        return [range(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)][:limit]


# --------------------------------------------------------------------------- loss_fn / eval_fn for the loop


def response_lengths(completions: CompletionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen lengths, rejected lengths) in tokens, each (B,), of a 2B-row pair batch (chosen rows first)."""
    return completions.response_mask.sum(-1).chunk(2)


def chosen_nll(logp_c: torch.Tensor, len_c: torch.Tensor) -> torch.Tensor:
    """The chosen responses' negative log-likelihood, one mean over all their tokens (TRL's ``sft`` loss),
    from their (B,) summed log-probs and (B,) lengths."""
    return -logp_c.sum() / len_c.sum().clamp(min=1)


def dpo_loss(model, batch: dict, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             rpo_alpha: float = 0.0, simpo_gamma_beta_ratio: float = 0.5,
             orpo_lambda: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Mean preference loss of the policy on a ``DPOBatches`` batch (plus ``rpo_alpha`` times the chosen
    answers' NLL; ORPO always adds it once), with TRL's metrics and token count."""
    logp_c, logp_r = pair_logprobs(model, batch["completions"])
    len_c, len_r = response_lengths(batch["completions"])
    ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
    loss = preference_loss(logp_c - ref_c, logp_r - ref_r, beta=beta, loss_type=loss_type,
                           label_smoothing=label_smoothing, chosen_len=len_c, rejected_len=len_r,
                           simpo_gamma_beta_ratio=simpo_gamma_beta_ratio, orpo_lambda=orpo_lambda).mean()
    tokens = int(batch["completions"].key_padding_mask.sum())
    extra = {}
    nll_weight = rpo_alpha + (1.0 if loss_type == "orpo" else 0.0)
    if nll_weight:
        nll = chosen_nll(logp_c, len_c)
        loss = loss + nll_weight * nll
        extra["nll_loss"] = nll.item()
    metrics = pair_metrics(logp_c, logp_r, ref_c, ref_r, len_c, len_r, beta=beta, loss_type=loss_type)
    return loss, {"tokens": tokens, **metrics, **extra}


@torch.no_grad()
def dpo_stats(model, batches: DPOBatches, *, beta: float, loss_type: str = "sigmoid",
              label_smoothing: float = 0.0, limit: int | None = None, **loss_kw) -> dict:
    """``loss`` (the preference term, without an NLL term) and TRL's metrics over every pair of ``batches``
    (or its first ``limit`` batches)."""
    parts = []
    for batch in batches.eval_batches(limit):
        logp_c, logp_r = pair_logprobs(model, batch["completions"])
        len_c, len_r = response_lengths(batch["completions"])
        parts.append(torch.stack([logp_c.float(), logp_r.float(), batch["ref_chosen"], batch["ref_rejected"],
                                  len_c.float(), len_r.float()]))
    logp_c, logp_r, ref_c, ref_r, len_c, len_r = torch.cat(parts, dim=1)
    loss = preference_loss(logp_c - ref_c, logp_r - ref_r, beta=beta, loss_type=loss_type,
                           label_smoothing=label_smoothing, chosen_len=len_c, rejected_len=len_r, **loss_kw).mean()
    return {"loss": loss.item(), **pair_metrics(logp_c, logp_r, ref_c, ref_r, len_c, len_r, beta=beta,
                                                loss_type=loss_type)}


def evaluate_dpo(model, batches: DPOBatches, **loss_kw) -> dict:
    """Held-out val_loss, val_accuracy (implicit reward of chosen > rejected) and val_margin."""
    s = dpo_stats(model, batches, **loss_kw)
    return {"val_loss": s["loss"], "val_accuracy": s["rewards/accuracies"], "val_margin": s["rewards/margins"]}
