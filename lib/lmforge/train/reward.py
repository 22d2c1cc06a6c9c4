"""Reward modelling: encode preference pairs, the Bradley-Terry loss, metrics, batches.

A pair is scored as two sequences, prompt + chosen reply and prompt + rejected
reply, each rendered with the chat template and ending with the reply's
``<|end|>``; ``RewardModel`` reads the score at the last real token. The loss
is Bradley-Terry's negative log-likelihood that the chosen reply wins,
``-log sigmoid(r_c - r_r - margin)`` (the margin as in Llama 2), plus reward
centering ``center_coef * (r_c + r_r)^2`` (Eisenstein et al. 2023): the BT
loss only sees differences, so without it the rewards drift by an arbitrary
offset that later stages (PPO) would read as signal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.train.sft import epoch_order


@dataclass
class PairExample:
    """Token ids of both sides of a pair; ``margin`` None when the data gives none."""

    chosen: list[int]
    rejected: list[int]
    margin: float | None = None
    truncated: bool = False


def encode_pairs(tok, pairs: Sequence[dict], max_seq_len: int) -> list[PairExample]:
    """Render each pair's prompt + reply with the chat template, cut to ``max_seq_len`` tokens.

    A reply that does not fit is cut at its end (``truncated`` set); a prompt
    that leaves no room for a single reply token is an error naming the pair.
    """
    out = []
    for i, pair in enumerate(pairs):
        where = pair.get("where") or f"preference pair {i}"
        prompt = tok.render_prompt(pair["prompt"], where=where)
        if len(prompt) >= max_seq_len:
            raise LmforgeError(
                f"{where}: the prompt is {len(prompt)} tokens, but model.max_seq_len is {max_seq_len}; "
                f"it leaves no room for a response (shorten the prompt or raise model.max_seq_len)")
        sides = [prompt + tok.encode(pair[k]) + [tok.end_id] for k in ("chosen", "rejected")]
        truncated = any(len(s) > max_seq_len for s in sides)
        chosen, rejected = (s[:max_seq_len] for s in sides)
        out.append(PairExample(chosen, rejected, pair.get("margin"), truncated))
    return out


# --------------------------------------------------------------------------- loss and metrics


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None, center_coef: float = 0.0) -> torch.Tensor:
    """mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2). Rewards (B,), margin (B,) or scalar."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected).pow(2).mean()
    return loss


@torch.no_grad()
def reward_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict:
    """accuracy (share with r_c > r_r; a tie counts as wrong), mean margin r_c - r_r,
    and the mean and population std of all 2B rewards."""
    both = torch.cat([r_chosen, r_rejected]).float()
    return {"accuracy": (r_chosen > r_rejected).float().mean().item(),
            "margin": (r_chosen - r_rejected).float().mean().item(),
            "reward_mean": both.mean().item(),
            "reward_std": both.std(correction=0).item()}


# --------------------------------------------------------------------------- batches


def pair_batch(examples: Sequence[PairExample], pad_id: int, device=None) -> dict:
    """Chosen rows then rejected rows, right-padded: input_ids and key_padding_mask (2B, T), margin (B,) or None."""
    seqs = [e.chosen for e in examples] + [e.rejected for e in examples]
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    key_padding_mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for r, s in enumerate(seqs):
        input_ids[r, :len(s)] = torch.tensor(s)
        key_padding_mask[r, :len(s)] = True
    margin = None
    if any(e.margin is not None for e in examples):
        margin = torch.tensor([e.margin or 0.0 for e in examples], dtype=torch.float32, device=device)
    return {"input_ids": input_ids.to(device), "key_padding_mask": key_padding_mask.to(device), "margin": margin}


class PairBatches:
    """Seeded per-epoch shuffled batches of pairs; ``batch(step, micro)`` is pure in its arguments."""

    def __init__(self, examples: Sequence[PairExample], *, batch_size: int, pad_id: int, seed: int,
                 grad_accum_steps: int = 1, device=None):
        if not examples:
            raise ValueError("PairBatches needs at least one pair")
        self.examples, self.pad_id, self.seed = list(examples), pad_id, seed
        self.accum, self.device = grad_accum_steps, device
        self.batch_size = min(batch_size, len(self.examples))
        self.per_epoch = len(self.examples) // self.batch_size
        self._order: tuple[int, list[int]] | None = None

    def batch(self, step: int, micro: int = 0) -> dict:
        epoch, k = divmod(step * self.accum + micro, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.examples), self.seed, epoch))
        picked = self._order[1][k * self.batch_size:(k + 1) * self.batch_size]
        return pair_batch([self.examples[i] for i in picked], self.pad_id, self.device)

    def eval_batches(self) -> Iterator[dict]:
        for i in range(0, len(self.examples), self.batch_size):
            yield pair_batch(self.examples[i:i + self.batch_size], self.pad_id, self.device)


def score_pairs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), from one forward over all 2B rows."""
    scores = model(batch["input_ids"], key_padding_mask=batch["key_padding_mask"]).float()
    return scores.chunk(2)


def reward_loss(model, batch: dict, *, center_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The Bradley-Terry loss of a ``RewardModel`` on a pair batch, with accuracy/margin metrics."""
    r_chosen, r_rejected = score_pairs(model, batch)
    loss = bradley_terry_loss(r_chosen, r_rejected, batch["margin"], center_coef)
    return loss, {"tokens": int(batch["key_padding_mask"].sum()), **reward_metrics(r_chosen, r_rejected)}


@torch.no_grad()
def evaluate_reward(model, batches: PairBatches, *, center_coef: float = 0.0) -> dict:
    """val_loss (BT loss, centering included) and val_ metrics over every held-out pair."""
    chosen, rejected, margins = [], [], []
    for batch in batches.eval_batches():
        rc, rr = score_pairs(model, batch)
        chosen.append(rc)
        rejected.append(rr)
        margins.append(batch["margin"] if batch["margin"] is not None else torch.zeros_like(rc))
    rc, rr, m = torch.cat(chosen), torch.cat(rejected), torch.cat(margins)
    metrics = {"val_loss": bradley_terry_loss(rc, rr, m, center_coef).item()}
    metrics.update({f"val_{k}": v for k, v in reward_metrics(rc, rr).items()})
    return metrics
