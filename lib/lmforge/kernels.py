"""Fast paths under the model: oneDNN's matrix product, decoding's fused projections, the fused loss.

Nothing here changes what the model computes, only how fast: every function
gives what its plain PyTorch expression gives (the tests compare them), and
``lmforge.model`` reads as the architecture because these live here.

- ``project`` / ``linear_no_grad``: nn.Linear through oneDNN on the CPU (training
  forward and input gradient; no-grad products such as decoding and loss chunks),
  torch.mv for a single row.
- ``fusable`` / ``stacked_weights``: q/k/v and gate/up concatenated into one product
  per decoding step.
- ``linear_cross_entropy``: cross-entropy of ``h @ weight.T`` chunk by chunk, never
  materializing the (N, V) logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# oneDNN's fp32 matrix product, the kernel PyTorch's compiler picks for CPU inference: with the
# few rows of a decoding step it beats F.linear's MKL product by ~1.5x here, and with the 2,048 rows
# of a training step by ~2x on AVX-512 CPUs where MKL runs generic code (bench/RESULTS.md).
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("lmforge::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The oneDNN product as an op torch.compile calls as it is (its own lowering of the
    underlying op wants weights frozen into the graph, which decoding a training model can't have)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _onednn_linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _onednn_linear_backward(ctx, grad):
    """d x = grad @ W through oneDNN again (W transposed once, a small copy); d W = grad.T @ x stays
    with torch.mm: oneDNN has no strided form of it, and transposing both activations costs more."""
    x, weight = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = _onednn_linear(grad, weight.t().contiguous(), None) if ctx.needs_input_grad[0] else None
    rows = grad.reshape(-1, grad.shape[-1])
    grad_w = rows.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
    grad_b = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


_onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for the block's projections. A plain float32 nn.Linear on CPU goes through
    oneDNN's product, forward and input gradient: on CPUs with AVX-512 that MKL serves with its
    generic code (AMD's), it runs twice as fast (bench/RESULTS.md). Adapters, quantized layers,
    layers with hooks and other devices or dtypes call the layer as usual."""
    if (type(layer) is nn.Linear and _onednn_serves(x, layer.weight) and not torch.is_autocast_enabled("cpu")
            and not (layer._forward_hooks or layer._forward_pre_hooks)):
        return _onednn_linear(x.contiguous(), layer.weight, layer.bias)
    return layer(x)


def _onednn_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's product applies: float32 input and weight on the CPU, oneDNN present."""
    return _ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32


def linear_no_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (..., in) -> (..., out) where no gradient flows through it: decoding, and the logits
    chunks of the fused loss. A single row goes through torch.mv, which streams the weight once where
    a one-row matrix product first repacks it (about 5 % of a batch-1 decoding step on CPU); more rows
    of float32 on CPU through oneDNN."""
    if x.numel() != x.shape[-1]:
        if not _onednn_serves(x, weight):
            return F.linear(x, weight, bias)
        if torch.compiler.is_compiling():
            return _onednn_linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    y = torch.mv(weight, x.reshape(-1))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], -1)


def fusable(*modules: nn.Module) -> bool:
    """Plain nn.Linear layers (not LoRA or quantized replacements), whose weights can be concatenated."""
    return all(type(m) is nn.Linear for m in modules)


def stacked_weights(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight (sum of outs, in) and bias of ``linears`` concatenated: one product for several projections
    of the same input when decoding (a KV cache keeps them for its session)."""
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in linears])
    return torch.cat([m.weight for m in linears]), bias


# --------------------------------------------------------------------------- fused loss


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
