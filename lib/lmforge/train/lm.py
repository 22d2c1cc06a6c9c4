"""Next-token prediction on packed token arrays: the pretraining data and loss."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import linear_no_grad

# Rows of logits per chunk in linear_cross_entropy: 4M floats (16 MB in fp32) stay in cache
# while they are turned into a gradient, instead of a (N, V) tensor that streams through memory.
# (512 rows at V = 8192 measured fastest on a 2-core CPU; 256 and 1024 rows were ~5 % slower.)
CHUNK_ELEMENTS = 2**22


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``h @ weight.T`` whose gradients are computed chunk by chunk in the forward.

    Neither the (N, V) logits nor their gradient ever exist at once: for each chunk
    of rows the logits become probabilities, the one-hot target is subtracted, and
    the two gradient matmuls consume them while they are hot. On CPU each chunk's
    logits come from oneDNN's product and the softmax is written over them; elsewhere
    two reused chunk buffers hold the logits and the softmax. The backward only
    scales the stored gradients by the incoming one.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, reduction: str, chunk: int, grad_enabled: bool):
        N, V = h.shape[0], weight.shape[0]
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))[:, None]
        n_valid = valid.sum()
        all_valid = bool(valid.all())
        # needs_input_grad is also set under no_grad (a parameter requires grad); no gradient is wanted then.
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        want_grad = need_h or need_w
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # On CPU the softmax overwrites the fresh logits (the kernel goes row by row, reading each
        # value before writing it); elsewhere it goes to a second reused buffer.
        in_place = h.device.type == "cpu" and h.dtype == torch.float32
        rows_max = min(chunk, N)
        logits = None if in_place else torch.empty(rows_max, V, dtype=torch.float32, device=h.device)
        probs = None if in_place or not want_grad else torch.empty_like(logits)
        minus_one = torch.full((rows_max, 1), -1.0, device=h.device)
        # On CPU d h = g @ weight goes through oneDNN too, which wants the weight transposed (one copy).
        weight_t = weight.t().contiguous() if in_place and need_h else None
        for start in range(0, N, chunk):
            rows = slice(start, start + chunk)
            n = h[rows].shape[0]
            if in_place:
                # oneDNN's product (~15 % faster than MKL's for this wide output on CPU) into a fresh
                # tensor: it has no out= form.
                z = linear_no_grad(h[rows], weight)
            elif h.dtype == torch.float32:
                z = torch.mm(h[rows], weight.T, out=logits[:n])
            else:  # autocast: the matmul in its dtype, the softmax in fp32
                z = logits[:n].copy_(h[rows] @ weight.T)
            if not want_grad:
                nll = _nll(z, safe[rows])
            elif not in_place:
                nll = _nll(z, safe[rows])  # before the softmax: no host sync on an accelerator
                g = torch._softmax(z, 1, False, out=probs[:n])
            else:
                # On CPU the loss is read off the softmax the gradient needs, -log p(target): one pass
                # over the chunk instead of two. Where p(target) is too small for fp32 to hold its
                # digits, that row's loss comes from its logits, computed again (z is overwritten).
                g = torch._softmax(z, 1, False, out=z)
                picked = g.gather(1, safe[rows]).squeeze(1)
                nll = -picked.log()
                tiny = picked < 1e-30
                if bool(tiny.any()):
                    bad = tiny.nonzero().squeeze(1)
                    nll[bad] = _nll(h[rows][bad] @ weight.T, safe[rows][bad])
            total += nll.sum() if all_valid else (nll * valid[rows]).sum()
            if not want_grad:
                continue
            # d loss / d logits = softmax - onehot (rows of ignored targets: 0), scaled in backward.
            g.scatter_add_(1, safe[rows], minus_one[:n])
            if not all_valid:
                g.mul_(valid[rows, None])
            g = g.to(h.dtype)
            if weight_t is not None:
                grad_h[rows] = linear_no_grad(g, weight_t)
            elif need_h:
                torch.mm(g, weight, out=grad_h[rows])
            if need_w:
                if grad_w is None:
                    grad_w = (g.T @ h[rows]).float()
                elif grad_w.dtype == g.dtype:
                    grad_w.addmm_(g.T, h[rows])
                else:
                    grad_w.add_(g.T @ h[rows])
        scale = 1.0 / n_valid.clamp(min=1) if reduction == "mean" else torch.ones((), device=h.device)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        ctx.save_for_backward(h, weight, targets, grad_h, grad_w, scale)
        if reduction == "mean":
            return total / n_valid  # 0/0 = nan when every target is ignored, as F.cross_entropy
        return total

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, targets, grad_h, grad_w, scale = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph (a Hessian step): the stored gradients are constants, so rebuild
            # them from differentiable ops; slow, but such steps are rare.
            grad_h, grad_w = _differentiable_grads(h, weight, targets, ctx.ignore_index, ctx.reduction)
            scale = torch.ones_like(scale)
        factor = grad_out * scale
        return (None if grad_h is None else grad_h * factor.to(grad_h.dtype),
                None if grad_w is None else (grad_w * factor).to(weight.dtype), None, None, None, None, None)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row, as logsumexp - logit(target): a read-only pass."""
    return torch.logsumexp(logits, 1) - logits.gather(1, targets).squeeze(1)


def _differentiable_grads(h, weight, targets, ignore_index: int, reduction: str):
    """The gradients of the unfused loss as a graph of h and weight: (softmax - onehot) / n, times weight / h."""
    valid = targets != ignore_index
    probs = torch.softmax((h @ weight.T).float(), dim=-1)
    onehot = F.one_hot(torch.where(valid, targets, torch.zeros_like(targets)), probs.shape[-1])
    g = (probs - onehot) * valid[:, None]
    if reduction == "mean":
        g = g / valid.sum()
    g = g.to(h.dtype)
    return g @ weight, g.T @ h


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean",
                         chunk_rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(h @ weight.T, targets)`` without materializing the logits.

    h (N, D) hidden states, weight (V, D) the output layer, targets (N,) int with
    ``ignore_index`` for positions that do not count. reduction: "mean" over counted
    targets or "sum". Logits, softmax and loss are fp32; under autocast the matmuls
    run in the autocast dtype. Same value and gradients as the unfused expression.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
    chunk = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, reduction, chunk,
                                         torch.is_grad_enabled())


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
