"""Next-token prediction on packed token arrays: the pretraining data and loss."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.kernels import linear_cross_entropy

def _plain_lm_head(model) -> bool:
    """Whether the fused loss can stand in for ``model.lm_head``: a bias-free nn.Linear (not an adapter)."""
    head = getattr(model, "lm_head", None)
    return type(head) is nn.Linear and head.bias is None and hasattr(model, "hidden_states")


def next_token_loss(model, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the model's predictions for x (B, T) against targets y (B, T).

    A plain output layer goes through ``linear_cross_entropy`` (no (B, T, V) logits);
    anything else (an adapter on lm_head, a model without ``hidden_states``) through its logits.
    """
    if _plain_lm_head(model):
        h = model.hidden_states(x)
        return linear_cross_entropy(h.flatten(0, 1), model.lm_head.weight, y.reshape(-1), reduction=reduction)
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction=reduction)


def lm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy of ``batch = (x, y)``, both (B, T) token ids."""
    x, y = batch
    return next_token_loss(model, x, y), {"tokens": x.numel()}


class TokenWindows:
    """Random (B, T+1) windows from a memory-mapped token file.

    The windows of step ``s`` are a pure function of (seed, s, micro), so a
    resumed run draws exactly the batches the uninterrupted one would have.
    """

    def __init__(self, path: str | Path, dtype: str, seq_len: int, batch_size: int, seed: int, device):
        self.data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.seq_len, self.batch_size, self.seed, self.device = seq_len, batch_size, seed, device
        if len(self.data) <= seq_len + 1:
            raise LmforgeError(
                f"{path}: only {len(self.data)} tokens, fewer than one training window of "
                f"model.max_seq_len+1 = {seq_len + 1}; add text or lower model.max_seq_len")

    def _stack(self, starts) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.data[s:s + self.seq_len + 1].astype(np.int64) for s in starts])
        t = torch.from_numpy(rows).to(self.device)
        return t[:, :-1], t[:, 1:]

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(hash((self.seed, step, micro)) & 0x7FFF_FFFF_FFFF_FFFF)
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (self.batch_size,), generator=g)
        return self._stack(starts.tolist())

    def eval_batches(self, n_batches: int):
        """Fixed, evenly spaced windows: the same held-out tokens at every evaluation."""
        n_windows = min(n_batches * self.batch_size, (len(self.data) - 1) // self.seq_len)
        starts = np.linspace(0, len(self.data) - self.seq_len - 1, n_windows).astype(np.int64)
        for i in range(0, n_windows, self.batch_size):
            yield self._stack(starts[i:i + self.batch_size])


@torch.no_grad()
def evaluate_lm(model, windows: TokenWindows, n_batches: int, bytes_per_token: float) -> dict:
    """val_loss (nats/token), perplexity and bits per byte over fixed held-out windows."""
    total, count = 0.0, 0
    for x, y in windows.eval_batches(n_batches):
        total += next_token_loss(model, x, y, reduction="sum").item()
        count += y.numel()
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": loss / math.log(2) / bytes_per_token}
