"""On-policy rollouts for PPO and GRPO, and their schedule inside the shared training loop.

An *iteration* samples responses for ``batch_size`` prompts from the current
policy, scores them, and computes whatever the algorithm needs (advantages,
old log-probs); then ``ppo_epochs`` passes over shuffled mini-batches of those
rollouts each take one optimizer step. ``RolloutSchedule.batch(step)`` maps
the loop's optimizer step onto (iteration, epoch, mini-batch), building a new
iteration's rollouts when the step enters it. The prompts and the mini-batch
order are pure functions of the step, and sampling uses the loop's restored
RNG state, so a resumed run continues the same prompt stream (the rollouts of
an iteration interrupted mid-way are sampled again from the resumed policy).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lmforge.data.prompts import prompt_ids
from lmforge.generate import generate
from lmforge.train.policy import CompletionBatch, completion_batch


@dataclass
class Rollout:
    """N sampled responses (rows) and their prompt records; ``extra`` holds per-row tensors an algorithm adds."""

    records: list[dict]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    responses: list[str]
    finished: torch.Tensor  # (N,) bool: stopped with <|end|> (False: ran out of max_new_tokens)
    batch: CompletionBatch  # prompt + response rows, right-padded
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.float)

    def select(self, rows: Sequence[int]) -> dict:
        """A mini-batch: the CompletionBatch rows plus every extra tensor's rows, as one dict."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        dev = self.batch.input_ids.device
        b = self.batch
        # Trim columns every selected row leaves as padding: shorter forward passes.
        T = int(b.key_padding_mask[idx.to(dev)].sum(1).max())
        out = {"batch": CompletionBatch(b.input_ids[idx.to(dev), :T], b.key_padding_mask[idx.to(dev), :T],
                                        b.response_mask[idx.to(dev), :T - 1])}
        for k, v in self.extra.items():
            v_idx = v[idx.to(v.device)]
            out[k] = v_idx[:, :T - 1] if v_idx.dim() == 2 else v_idx
        return out


def sample_rollout(policy, tok, records: Sequence[dict], *, n_per_prompt: int, max_new_tokens: int,
                   temperature: float, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                   batch_size: int | None = None, device=None) -> Rollout:
    """``n_per_prompt`` samples for each record (rows grouped: prompt 0's samples first), stopped at ``<|end|>``."""
    rows = [r for r in records for _ in range(n_per_prompt)]
    prompts = [prompt_ids(tok, r["prompt"]) for r in rows]
    out = generate(policy, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, stop_ids=(tok.end_id,), pad_id=tok.pad_id, generator=generator,
                   batch_size=batch_size)
    # An empty response (context already full) still needs one target position: keep <|end|> as its token.
    responses_ids = [ids if ids else [tok.end_id] for ids in out.tokens]
    texts = [tok.decode([t for t in ids if t != tok.end_id]) for ids in responses_ids]
    return Rollout(records=list(rows), prompt_ids=prompts, response_ids=responses_ids, responses=texts,
                   finished=torch.tensor(out.finished, dtype=torch.bool),
                   batch=completion_batch(prompts, responses_ids, tok.pad_id, device=device))


def prompt_stream(records: Sequence[dict], per_iteration: int, seed: int) -> Callable[[int], list[dict]]:
    """iteration -> its prompts: epochs over a seeded shuffle of ``records``, each prompt once per epoch."""
    n = len(records)

    def prompts(iteration: int) -> list[dict]:
        out = []
        for pos in range(iteration * per_iteration, (iteration + 1) * per_iteration):
            epoch, i = divmod(pos, n)
            order = list(range(n))
            random.Random(f"{seed}:prompts:{epoch}").shuffle(order)
            out.append(records[order[i]])
        return out

    return prompts


class RolloutSchedule:
    """``batch(step, micro)`` for the training loop: the mini-batch an optimizer step trains on.

    make_rollout(iteration) -> Rollout builds an iteration's rollouts with the
    current policy; ``n_rows`` rows are split into ``n_minibatches`` mini-batches
    per epoch, ``ppo_epochs`` epochs per iteration.
    """

    def __init__(self, make_rollout: Callable[[int], Rollout], *, n_rows: int, n_minibatches: int,
                 ppo_epochs: int, seed: int, rows_per_unit: int = 1):
        self.make_rollout, self.n_rows, self.n_mb = make_rollout, n_rows, n_minibatches
        self.ppo_epochs, self.seed, self.unit = ppo_epochs, seed, rows_per_unit
        self.steps_per_iteration = ppo_epochs * n_minibatches
        self.iteration, self.rollout = None, None
        self.on_new_rollout: Callable[[int, Rollout], None] | None = None

    def batch(self, step: int, micro: int = 0) -> dict:
        iteration, within = divmod(step, self.steps_per_iteration)
        if iteration != self.iteration:
            self.rollout, self.iteration = self.make_rollout(iteration), iteration
            if self.on_new_rollout is not None:
                self.on_new_rollout(iteration, self.rollout)
        epoch, mb = divmod(within, self.n_mb)
        # Shuffle whole units (GRPO: a prompt's group stays together), then take this mini-batch's share.
        units = list(range(self.n_rows // self.unit))
        random.Random(f"{self.seed}:minibatch:{iteration}:{epoch}").shuffle(units)
        per_mb = len(units) // self.n_mb
        chosen = units[mb * per_mb:(mb + 1) * per_mb]
        rows = [u * self.unit + j for u in chosen for j in range(self.unit)]
        return {**self.rollout.select(rows), "iteration": iteration, "epoch": epoch}
