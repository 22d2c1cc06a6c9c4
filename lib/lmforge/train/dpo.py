"""Direct preference optimisation: the losses, the frozen reference's cached log-probs, batches, metrics.

DPO (Rafailov et al. 2023) trains the policy directly on preference pairs.
With ``h = (log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))``,
the log-probabilities summed over each response's tokens, a pair's loss is

* ``sigmoid``: ``-(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)``; ``ls``
  (label smoothing) > 0 is conservative DPO, for labels flipped with probability ls;
* ``ipo``: ``(h - 1 / (2 beta))^2`` (Azar et al. 2023), which stops pushing once the
  log-ratio gap reaches its target instead of driving it to infinity;
* ``hinge``: ``relu(1 - beta h)`` (the SLiC loss).

``rpo_alpha`` > 0 adds ``rpo_alpha`` times the chosen response's mean per-token
negative log-likelihood (RPO, Pang et al. 2024; TRL's ``rpo_alpha``): DPO alone
can lower the likelihood of the chosen answers too, and the freed mass then goes
to responses no pair shows (an empty answer, say); the NLL term holds it on them.

The reference is frozen, so its log-probs of every pair are computed once
before training (``reference_logprobs``) and carried in each batch: the
reference never runs during training. ``beta * (log p - log p_ref)`` is the
implicit reward of a response; the metrics use TRL's names for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from lmforge.device import autocast
from lmforge.errors import LmforgeError
from lmforge.train.policy import CompletionBatch, completion_batch, sequence_logprobs
from lmforge.train.reward import encode_pairs
from lmforge.train.sft import epoch_order

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


# --------------------------------------------------------------------------- losses (pure)


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss, (B,), from log-ratio gaps h (B,); label smoothing gives conservative DPO."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair IPO loss, (B,): squared distance of h from its target 1 / (2 beta)."""
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair hinge (SLiC) loss, (B,)."""
    return F.relu(1 - beta * h)


def preference_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, *, beta: float,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss (B,) from log p - log p_ref of the chosen and rejected responses, each (B,)."""
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        return sigmoid_loss(h, beta, label_smoothing)
    if loss_type == "ipo":
        return ipo_loss(h, beta)
    if loss_type == "hinge":
        return hinge_loss(h, beta)
    raise LmforgeError(f"config key 'dpo.loss_type': {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


@torch.no_grad()
def dpo_metrics(logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                beta: float) -> dict:
    """TRL's per-batch numbers: implicit rewards beta * (log p - log p_ref), their margin and accuracy
    (chosen reward above rejected; a tie counts as wrong), and the policy's mean log-probs. Inputs (B,)."""
    r_c, r_r = beta * (logp_c - ref_c), beta * (logp_r - ref_r)
    return {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
            "rewards/margins": (r_c - r_r).mean().item(), "rewards/accuracies": (r_c > r_r).float().mean().item(),
            "logps/chosen": logp_c.mean().item(), "logps/rejected": logp_r.mean().item()}


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


def chosen_nll(logp_c: torch.Tensor, completions: CompletionBatch) -> torch.Tensor:
    """Mean over pairs of the chosen response's per-token negative log-likelihood: -log p(chosen) / its
    length, from the (B,) summed log-probs and the 2B-row batch (chosen rows first)."""
    lengths = completions.response_mask.sum(-1)[:len(logp_c)].clamp(min=1)
    return (-logp_c / lengths).mean()


def dpo_loss(model, batch: dict, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, rpo_alpha: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean preference loss of the policy on a ``DPOBatches`` batch (plus ``rpo_alpha`` times the chosen
    answers' NLL), with TRL's metrics and token count."""
    logp_c, logp_r = pair_logprobs(model, batch["completions"])
    ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
    loss = preference_loss(logp_c - ref_c, logp_r - ref_r, beta=beta, loss_type=loss_type,
                           label_smoothing=label_smoothing).mean()
    tokens = int(batch["completions"].key_padding_mask.sum())
    extra = {}
    if rpo_alpha:
        nll = chosen_nll(logp_c, batch["completions"])
        loss = loss + rpo_alpha * nll
        extra["nll_loss"] = nll.item()
    return loss, {"tokens": tokens, **dpo_metrics(logp_c, logp_r, ref_c, ref_r, beta), **extra}


@torch.no_grad()
def dpo_stats(model, batches: DPOBatches, *, beta: float, loss_type: str = "sigmoid",
              label_smoothing: float = 0.0, limit: int | None = None) -> dict:
    """``loss`` and TRL's metrics over every pair of ``batches`` (or its first ``limit`` batches)."""
    parts = []
    for batch in batches.eval_batches(limit):
        logp_c, logp_r = pair_logprobs(model, batch["completions"])
        parts.append(torch.stack([logp_c.float(), logp_r.float(), batch["ref_chosen"], batch["ref_rejected"]]))
    logp_c, logp_r, ref_c, ref_r = torch.cat(parts, dim=1)
    loss = preference_loss(logp_c - ref_c, logp_r - ref_r, beta=beta, loss_type=loss_type,
                           label_smoothing=label_smoothing).mean()
    return {"loss": loss.item(), **dpo_metrics(logp_c, logp_r, ref_c, ref_r, beta)}


def evaluate_dpo(model, batches: DPOBatches, **loss_kw) -> dict:
    """Held-out val_loss, val_accuracy (implicit reward of chosen > rejected) and val_margin."""
    s = dpo_stats(model, batches, **loss_kw)
    return {"val_loss": s["loss"], "val_accuracy": s["rewards/accuracies"], "val_margin": s["rewards/margins"]}
