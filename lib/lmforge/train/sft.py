"""Supervised fine-tuning: encode conversations, batch them (packed or padded), the masked loss.

An example of L tokens trains L-1 next-token predictions: inputs ``ids[:-1]``,
targets ``ids[1:]``, weighted by ``mask[1:]`` (assistant content and its
``<|end|>``). So a conversation may hold ``max_seq_len + 1`` tokens and still
fit the context: its last token is only ever a target.

Two batch layouts give the same loss on the same conversations:

- **packed**: conversations are laid end to end in rows of exactly
  ``seq_len`` positions; ``doc_ids`` keeps attention inside each conversation
  and ``packed_position_ids`` restarts positions at each one, so a packed
  conversation computes exactly what it would alone.
- **padded**: one conversation per row, right-padded to the longest in the
  batch. No attention mask is needed: with right padding a real token never
  sees a pad (pads come later and attention is causal), so the model keeps
  its fast plain-causal path; pad positions carry no loss.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from lmforge.model import packed_position_ids

IGNORE = -100  # cross_entropy's ignore_index: positions that carry no loss


@dataclass
class Example:
    """One encoded conversation: token ids and a 0/1 loss mask of the same length."""

    ids: list[int]
    mask: list[int]

    @property
    def n_positions(self) -> int:
        """Input positions it occupies in a row (its last token is only a target)."""
        return len(self.ids) - 1

    def targets(self) -> list[int]:
        """ids[1:] with untrained positions set to IGNORE."""
        return [t if m else IGNORE for t, m in zip(self.ids[1:], self.mask[1:])]


def encode_conversations(tok, convs: Sequence[Sequence[dict]], max_seq_len: int,
                         train_on_all: bool = False) -> tuple[list[Example], int]:
    """Render conversations with the chat template; returns (examples, n_truncated).

    Each example keeps at most ``max_seq_len + 1`` tokens (the end is cut).
    ``train_on_all`` trains on every token, prompts included, instead of the
    assistant turns only. Truncated conversations that keep no trained token
    are dropped (they would cost compute and teach nothing); they still count
    in ``n_truncated``.
    """
    examples, n_truncated = [], 0
    for conv in convs:
        ids, mask = tok.render_chat(conv)
        if train_on_all:
            mask = [1] * len(ids)
        if len(ids) > max_seq_len + 1:
            ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
            n_truncated += 1
        if any(mask[1:]):
            examples.append(Example(ids, mask))
    return examples, n_truncated


# --------------------------------------------------------------------------- layouts


def pack(examples: Sequence[Example], seq_len: int) -> list[list[int]]:
    """Group examples into rows of at most ``seq_len`` positions (best-fit decreasing).

    Returns the example indices of each row. Longest first, each into the
    fullest row it still fits: rows end up nearly full, with few rows.
    """
    order = sorted(range(len(examples)), key=lambda i: (-examples[i].n_positions, i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free positions, row index), ascending
    for i in order:
        need = examples[i].n_positions
        if need > seq_len:
            raise ValueError(f"example {i} needs {need} positions, more than seq_len={seq_len}")
        k = bisect.bisect_left(free, (need, -1))
        if k == len(free):
            rows.append([i])
            row, left = len(rows) - 1, seq_len - need
        else:
            left, row = free.pop(k)
            rows[row].append(i)
            left -= need
        if left > 0:
            bisect.insort(free, (left, row))
    return rows


def packed_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], seq_len: int,
                 pad_id: int, device=None) -> dict:
    """Tensors for packed rows: input_ids, targets, doc_ids, position_ids, each (B, seq_len).

    Trailing free positions get doc id -1, so no real token attends to them.
    """
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    doc_ids = torch.full((B, seq_len), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        need = sum(examples[i].n_positions for i in members)
        if need > seq_len:
            raise ValueError(f"row {r} needs {need} positions, more than seq_len={seq_len}")
        at = 0
        for d, i in enumerate(members):
            ex, n = examples[i], examples[i].n_positions
            input_ids[r, at:at + n] = torch.tensor(ex.ids[:-1])
            targets[r, at:at + n] = torch.tensor(ex.targets())
            doc_ids[r, at:at + n] = d
            at += n
    batch = {"input_ids": input_ids, "targets": targets, "doc_ids": doc_ids,
             "position_ids": packed_position_ids(doc_ids)}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def padded_batch(examples: Sequence[Example], indices: Sequence[int], pad_id: int, device=None) -> dict:
    """Tensors for one example per row, right-padded to the longest: input_ids, targets, (B, T)."""
    T = max(examples[i].n_positions for i in indices)
    input_ids = torch.full((len(indices), T), pad_id, dtype=torch.long)
    targets = torch.full((len(indices), T), IGNORE, dtype=torch.long)
    for r, i in enumerate(indices):
        ex, n = examples[i], examples[i].n_positions
        input_ids[r, :n] = torch.tensor(ex.ids[:-1])
        targets[r, :n] = torch.tensor(ex.targets())
    batch = {"input_ids": input_ids, "targets": targets,
             "n_real": sum(examples[i].n_positions for i in indices)}
    return {k: v.to(device) if torch.is_tensor(v) and device is not None else v for k, v in batch.items()}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randperm(n, generator=g).tolist()


class SFTBatches:
    """Training and evaluation batches of encoded conversations.

    The unit of batching is a packed row (``packing=True``) or one conversation.
    Each epoch visits the units in a fresh seeded order, ``batch_size`` at a
    time (a remainder smaller than a batch waits for the next epoch's order).
    ``batch(step, micro)`` is a pure function of its arguments, so a resumed
    run sees the batches the uninterrupted run would have.
    """

    def __init__(self, examples: Sequence[Example], *, seq_len: int, batch_size: int, pad_id: int,
                 seed: int, packing: bool = True, grad_accum_steps: int = 1, device=None):
        if not examples:
            raise ValueError("SFTBatches needs at least one example")
        self.examples, self.seq_len, self.pad_id = list(examples), seq_len, pad_id
        self.seed, self.packing, self.accum, self.device = seed, packing, grad_accum_steps, device
        self.units = pack(self.examples, seq_len) if packing else [[i] for i in range(len(self.examples))]
        self.batch_size = min(batch_size, len(self.units))
        self.per_epoch = len(self.units) // self.batch_size
        self._order: tuple[int, list[int]] | None = None  # (epoch, permutation) of the last epoch used

    def _make(self, units: Sequence[list[int]]) -> dict:
        if self.packing:
            return packed_batch(self.examples, units, self.seq_len, self.pad_id, self.device)
        return padded_batch(self.examples, [u[0] for u in units], self.pad_id, self.device)

    def batch(self, step: int, micro: int = 0) -> dict:
        """The micro-batch ``micro`` of optimizer step ``step``."""
        epoch, k = divmod(step * self.accum + micro, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.units), self.seed, epoch))
        picked = self._order[1][k * self.batch_size:(k + 1) * self.batch_size]
        return self._make([self.units[u] for u in picked])

    def eval_batches(self) -> Iterator[dict]:
        """Every unit once, in a fixed order: the same held-out tokens at every evaluation."""
        for i in range(0, len(self.units), self.batch_size):
            yield self._make(self.units[i:i + self.batch_size])

    @property
    def epoch_steps(self) -> float:
        """Optimizer steps per pass over the data."""
        return self.per_epoch / self.accum


# --------------------------------------------------------------------------- loss


def _target_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the N positions that carry loss, and their targets (N,)."""
    kwargs = {k: batch[k] for k in ("doc_ids", "position_ids") if k in batch}
    targets = batch["targets"]
    keep = targets != IGNORE
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        # The vocabulary projection is the costliest layer of a small model; skip it
        # at prompt and pad positions, which carry no loss.
        h = model.hidden_states(batch["input_ids"], **kwargs)
        return model.lm_head(h[keep]), targets[keep]
    return model(batch["input_ids"], **kwargs)[keep], targets[keep]


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the trained (assistant) tokens of a batch.

    metrics: ``tokens`` = real (non-pad) input tokens processed, for tokens/s.
    """
    logits, targets = _target_logits(model, batch)
    loss = F.cross_entropy(logits.float(), targets)
    return loss, {"tokens": _real_tokens(batch)}


def _real_tokens(batch: dict) -> int:
    if "doc_ids" in batch:
        return int((batch["doc_ids"] >= 0).sum())
    return int(batch["n_real"])


@torch.no_grad()
def evaluate_sft(model, batches: SFTBatches) -> dict:
    """val_loss: cross-entropy per trained token over every held-out conversation."""
    total, count = 0.0, 0
    for batch in batches.eval_batches():
        logits, targets = _target_logits(model, batch)
        total += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += targets.numel()
    return {"val_loss": total / max(count, 1)}
