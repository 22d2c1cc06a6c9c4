"""4-bit NormalFloat (NF4) weights for QLoRA: blockwise absmax quantization, optional double quantization.

The scheme of the QLoRA paper (Dettmers et al. 2023, section 3):

- A weight matrix is cut, in row-major order, into blocks of ``BLOCK_SIZE`` = 64
  values. Each block is divided by its absolute maximum (its *absmax*, kept as a
  float32 constant), and each value in [-1, 1] is replaced by the index of the
  nearest of the 16 NF4 code values (``NF4_CODE``, below): 4 bits. Two indices
  are packed in one byte, so a weight costs 4 bits + 32/64 bits of constant.
- Double quantization quantizes those absmax constants again: their mean is
  subtracted (they are all positive; centring them uses the signed range), and
  they are stored as 8-bit integers with one float32 scale per block of
  ``DQ_BLOCK_SIZE`` = 256 constants: 4 + 8/64 + 32/(64*256) = 4.127 bits a weight.
  (The paper stores them as 8-bit floats; symmetric int8 after centring costs
  the same bytes and has an error of at most half a step, scale/127/2.)
- Compute dequantizes a whole matrix (code lookup times absmax) into the compute
  dtype just before its matmul. The backward pass dequantizes again instead of
  keeping the dequantized matrix alive, so at most one full-precision matrix
  exists at a time (``_NF4Linear``).

Why in-house and not ``torchao`` or ``bitsandbytes`` (both install with torch
2.13): torchao's NF4 tensor always double-quantizes, requires the number of
blocks to be a multiple of 256 (it refuses the CPU-small preset's 688 x 256 MLP
matrices) and loads compiled extensions that fail on this CPU build;
bitsandbytes is a 125 MB wheel whose CPU path is new and warns about a missing
kernels package. Speed is not the difference: one thread, a 1024 x 256 weight
times 2048 rows, fp32 matmul 10.7 ms, this module (dequantize 0.4 ms + matmul)
11.1 ms, bitsandbytes ``matmul_4bit`` 10.8 ms, torchao ``linear_nf4`` 12.0 ms.
Here it is ~150 lines of torch that run the same on CPU and CUDA, with plain
uint8/int8/float32 buffers in the state dict.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SIZE = 64
DQ_BLOCK_SIZE = 256

# The 16 NF4 values (QLoRA paper, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0;
# 8 values at or above 0 and 7 below it, so that 0 has a code of its own.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_code(device=None) -> torch.Tensor:
    """The 16 code values as a float32 tensor (16,), ascending."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x flattened and zero-padded to whole blocks: (n_blocks, block)."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(-1, block)


def quantize_nf4(w: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed (ceil(n/2),) uint8, absmax (n_blocks,) float32) of any-shape float ``w`` with n elements.

    Index i of element 2j sits in the high nibble of byte j, element 2j+1 in the low nibble.
    """
    blocks = _blocks(w.detach().float(), block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    code = nf4_code(w.device)
    # Nearest code value: the code's midpoints split [-1, 1] into 16 buckets.
    idx = torch.bucketize(scaled.reshape(-1), (code[1:] + code[:-1]) / 2)[: w.numel()].to(torch.uint8)
    if idx.numel() % 2:
        idx = F.pad(idx, (0, 1))
    return (idx[0::2] << 4) | idx[1::2], absmax


def nf4_indices(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit indices (2 * len(packed),) int64 of a packed uint8 tensor, in element order."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1).long()


def quantize_absmax(absmax: torch.Tensor, block_size: int = DQ_BLOCK_SIZE):
    """Double quantization: (int8 (n,), per-block scale (ceil(n/block),) float32, mean () float32)."""
    mean = absmax.mean()
    blocks = _blocks(absmax - mean, block_size)
    scale = blocks.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(blocks / scale[:, None] * 127).to(torch.int8).reshape(-1)[: absmax.numel()]
    return q, scale, mean


def dequantize_absmax(q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                      block_size: int = DQ_BLOCK_SIZE) -> torch.Tensor:
    """Inverse of ``quantize_absmax``: (n,) float32."""
    n = q.numel()
    blocks = _blocks(q.float(), block_size) * (scale[:, None] / 127)
    return blocks.reshape(-1)[:n] + mean


class NF4Weight(nn.Module):
    """One weight matrix in NF4: buffers ``packed`` (uint8) and ``absmax`` (float32), or with double
    quantization ``absmax_q`` (int8), ``absmax_scale`` and ``absmax_mean`` (float32).

    Holds no parameters: the base weights of QLoRA are frozen. ``dequantize()`` gives
    the matrix back, ``rows(ids)`` only the rows an embedding lookup needs.
    """

    def __init__(self, w: torch.Tensor, *, double_quant: bool = False, block_size: int = BLOCK_SIZE):
        super().__init__()
        self.shape = tuple(w.shape)
        self.block_size = block_size
        self.double_quant = double_quant
        packed, absmax = quantize_nf4(w, block_size)
        self.register_buffer("packed", packed)
        if double_quant:
            q, scale, mean = quantize_absmax(absmax)
            self.register_buffer("absmax_q", q)
            self.register_buffer("absmax_scale", scale)
            self.register_buffer("absmax_mean", mean)
        else:
            self.register_buffer("absmax", absmax)
        code = nf4_code(w.device)
        self.register_buffer("code", code, persistent=False)
        # Both values of every possible byte, (256, 2): one gather dequantizes two weights.
        byte = torch.arange(256, device=w.device)
        self.register_buffer("pairs", torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1), persistent=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def block_absmax(self) -> torch.Tensor:
        """(n_blocks,) float32 scale of every block."""
        if self.double_quant:
            return dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_mean)
        return self.absmax

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The matrix, ``self.shape``, in ``dtype``: code value times its block's absmax."""
        values = self.pairs.index_select(0, self.packed.int()).reshape(-1)
        blocks = _blocks(values, self.block_size) * self.block_absmax()[:, None]
        return blocks.reshape(-1)[: self.numel].view(self.shape).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` (any shape) of the matrix: (*ids.shape, n_cols), without dequantizing the others."""
        cols = self.shape[1]
        flat = ids[..., None] * cols + torch.arange(cols, device=ids.device)  # element index of each value
        nibble = torch.where(flat % 2 == 0, self.packed[flat // 2] >> 4, self.packed[flat // 2] & 0xF)
        return (self.code[nibble.long()] * self.block_absmax()[flat // self.block_size]).to(dtype)

    def nbytes(self) -> int:
        """Bytes of the stored buffers (the packed codes and the constants)."""
        return sum(b.numel() * b.element_size() for b in self.state_dict().values())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, block_size={self.block_size}, double_quant={self.double_quant}"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul with ``x`` runs in: autocast's where it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _NF4Linear(torch.autograd.Function):
    """x @ dequantize(w).T whose backward dequantizes again: no full-precision weight is saved for it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
        ctx.weight, ctx.x_dtype = weight, x.dtype
        dtype = _compute_dtype(x)
        return F.linear(x.to(dtype), weight.dequantize(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The weight is frozen: only the input's gradient, grad @ W.
        return (grad @ ctx.weight.dequantize(grad.dtype)).to(ctx.x_dtype), None


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in NF4 (the bias, if any, stays float32)."""

    def __init__(self, quantized: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.quantized = quantized
        self.out_features, self.in_features = quantized.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, double_quant: bool = False) -> "NF4Linear":
        return cls(NF4Weight(linear.weight, double_quant=double_quant), linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in), for code that reads ``.weight`` of a linear layer."""
        return self.quantized.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)"""
        y = _NF4Linear.apply(x, self.quantized)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class NF4Embedding(nn.Module):
    """A frozen ``nn.Embedding`` whose table is stored in NF4; a lookup dequantizes only the rows it reads."""

    def __init__(self, quantized: NF4Weight):
        super().__init__()
        self.quantized = quantized
        self.num_embeddings, self.embedding_dim = quantized.shape

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (num_embeddings, embedding_dim)."""
        return self.quantized.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) int -> (..., embedding_dim) float32"""
        return self.quantized.rows(ids)


def quantize_model(model: nn.Module, *, double_quant: bool = False) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` and ``nn.Embedding`` of a Transformer by its NF4 version.

    A tied output head keeps sharing its table with the embedding (one NF4Weight, stored once).
    Norms and biases stay float32: they are vectors, a rounding error of the total.
    Returns ``model``.
    """
    done: dict[int, NF4Weight] = {}  # id of a float weight -> its quantized version (tied weights once)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (nn.Linear, nn.Embedding)):
                continue
            key = id(child.weight)
            if key not in done:
                done[key] = NF4Weight(child.weight, double_quant=double_quant)
            if isinstance(child, nn.Linear):
                setattr(parent, name, NF4Linear(done[key], child.bias))
            else:
                setattr(parent, name, NF4Embedding(done[key]))
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """The inverse of ``quantize_model`` (up to its rounding): float32 ``nn.Linear``/``nn.Embedding``
    modules again, tied weights tied again. Returns ``model``."""
    done: dict[int, nn.Parameter] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (NF4Linear, NF4Embedding)):
                continue
            key = id(child.quantized)
            if key not in done:
                done[key] = nn.Parameter(child.quantized.dequantize(), requires_grad=False)
            if isinstance(child, NF4Linear):
                new = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device=done[key].device)
                if child.bias is not None:
                    new.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            else:
                new = nn.Embedding(child.num_embeddings, child.embedding_dim, device=done[key].device)
            new.weight = done[key]
            setattr(parent, name, new)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, NF4Weight) for m in model.modules())


def weight_nbytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored (its state dict), a tensor shared by two names once."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
