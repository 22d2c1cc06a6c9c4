"""Log-probabilities of responses under a causal LM: what DPO, PPO, GRPO and evaluation share.

A *completion* is a rendered prompt (chat template up to the assistant tag)
followed by response tokens. Rows are right-padded into one batch; the
response mask marks, on the shifted target axis, the positions whose target is
a response token, so ``(logps * mask).sum(-1)`` is log p(response | prompt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.loader import build_model, read_checkpoint
from lmforge.lora import BaseView, has_adapters


@dataclass
class CompletionBatch:
    """input_ids (B, T); key_padding_mask (B, T) True = real; response_mask (B, T-1) float on targets."""

    input_ids: torch.Tensor
    key_padding_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device) -> "CompletionBatch":
        return CompletionBatch(self.input_ids.to(device), self.key_padding_mask.to(device),
                               self.response_mask.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def completion_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                     device=None) -> CompletionBatch:
    """Right-padded prompt + response rows. Response token j of row i is target position len(prompt_i)-1+j."""
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    real = torch.zeros((len(rows), T), dtype=torch.bool)
    resp = torch.zeros((len(rows), T - 1))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(rows[i], dtype=torch.long)
        real[i, :n] = True
        resp[i, len(p) - 1:n - 1] = 1.0
    return CompletionBatch(ids, real, resp).to(device) if device is not None else CompletionBatch(ids, real, resp)


def token_logprobs(model, batch: CompletionBatch, *, temperature: float = 1.0, return_entropy: bool = False):
    """log p(target_t | prefix) for every target position, (B, T-1) float32 (zero where masked out).

    ``temperature`` scales the logits as sampling did, so PPO/GRPO ratios compare
    the distribution the responses were actually drawn from. With
    ``return_entropy`` also the entropy of each predictive distribution, (B, T-1).
    """
    logits = model(batch.input_ids, key_padding_mask=batch.key_padding_mask)[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch.input_ids[:, 1:]
    logps = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * batch.response_mask
    if not return_entropy:
        return logps
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1) * batch.response_mask
    return logps, entropy


def sequence_logprobs(model, batch: CompletionBatch) -> torch.Tensor:
    """log p(response | prompt) per row, (B,)."""
    return token_logprobs(model, batch).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (all positions when dim is None)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def load_reference(path, policy_path, policy_ckpt: dict, *, device, key: str, policy=None):
    """A frozen causal LM to measure log-probs against: eval mode, no grads, loaded once.

    It must share the policy's tokenizer and vocabulary exactly: log-probs over other
    ids, or over a wider softmax, are not comparable with the policy's. When ``path`` is
    the policy's own file and ``policy`` (the loaded policy) carries LoRA adapters, the
    reference is that policy with its adapters off (``lora.BaseView``): no second copy.
    """
    if policy is not None and str(path) == str(policy_path) and has_adapters(policy):
        return BaseView(policy)

    try:
        ckpt = read_checkpoint(path)  # read once: checked, then built
        theirs = (ckpt["tokenizer_sha256"], ckpt["model_config"]["vocab_size"])
        ours = (policy_ckpt["tokenizer_sha256"], policy_ckpt["model_config"]["vocab_size"])
        if theirs != ours:
            raise LmforgeError(
                f"{path} has tokenizer {theirs[0][:12]} and vocab_size {theirs[1]}, but the policy {policy_path} "
                f"has tokenizer {ours[0][:12]} and vocab_size {ours[1]}; the reference must share the policy's "
                f"tokenizer and vocabulary")
        model, _ = build_model(ckpt, path, device=device)
    except LmforgeError as e:
        raise LmforgeError(f"config key '{key}': {e}") from None
    return model.eval().requires_grad_(False)
