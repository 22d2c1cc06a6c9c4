"""The decoder-only transformer: every architecture option in one readable file.

Read top to bottom: the config and its validation, positional encodings
(rope / yarn / alibi / sinusoidal / learned), the one attention-mask builder,
the KV cache, the blocks (attention, MLP), the model, and the thin reward and
value wrappers used by the alignment stages. The fast paths under it (oneDNN
products on the CPU, decoding's concatenated projections) are ``lmforge.kernels``.

Module names mirror Hugging Face Llama (``embed_tokens``, ``layers.N.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ``norm``, ``lm_head`` …) so that LoRA
target names and the safetensors export need no translation table.

Shapes: B batch, T new tokens, S keys (cached + new), H query heads,
K key/value heads, hd head dim, D d_model, V vocab.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.errors import LmforgeError
from lmforge.kernels import fusable, linear_no_grad, project, stacked_weights
from lmforge.model_config import (ACTIVATIONS, ATTENTION_TYPES, NORM_TYPES,  # noqa: F401 (re-exported)
                                  POSITIONAL_ENCODINGS, ModelConfig)

# YaRN's ramp bounds (alpha, beta in the paper): dimensions that rotate fewer
# than alpha times over the trained context are fully interpolated, those that
# rotate more than beta times are left untouched.
YARN_ALPHA = 1.0
YARN_BETA = 32.0


# --------------------------------------------------------------------------- positions


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """Rotation speed of each dimension pair, theta^(-2i/hd). Returns (hd/2,)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def yarn_frequencies(head_dim: int, theta: float, factor: float, original_len: int) -> torch.Tensor:
    """YaRN "NTK-by-parts" frequencies (Peng et al. 2023, eq. 18-20). Returns (hd/2,).

    A pair that turns r = L / wavelength times over the trained context L keeps
    its frequency when r > beta (high frequencies carry local order), is divided
    by the factor s when r < alpha (low frequencies must be interpolated to stay
    in the trained range), and is blended linearly in between.
    """
    freqs = rope_frequencies(head_dim, theta)
    rotations = original_len * freqs / (2 * math.pi)
    gamma = ((rotations - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0.0, 1.0)
    return (1 - gamma) * freqs / factor + gamma * freqs


def yarn_attention_scale(factor: float) -> float:
    """YaRN's sqrt(1/t) = 0.1 ln(s) + 1, applied to both q and k (so logits scale by its square)."""
    return 0.1 * math.log(factor) + 1.0


def rope_tables(freqs: torch.Tensor, max_len: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (max_len, hd), halves repeated (rotate-half layout)."""
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate dimension pairs (i, i + hd/2) of x (B, heads, T, hd) by the angles in cos/sin (B|1, 1, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n), … .

    For a head count that is not a power of two, take the slopes of the closest
    smaller power of two m, then every other slope of 2m heads until n are filled.
    """
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    m = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(m) + power_of_two(2 * m)[0::2][: n_heads - m]
    return torch.tensor(slopes, dtype=torch.float32)


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """The fixed table of Vaswani et al.: even dims sin(pos/10000^(2i/d)), odd dims cos(…). (max_len, D)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)
    return table


def packed_position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the doc id changes along a row. (B, T) -> (B, T)."""
    T = doc_ids.shape[-1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    run_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - run_start


def padded_position_ids(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row starts at 0. (B, S) bool -> (B, S)."""
    return (key_padding_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------- attention mask


def attention_mask(
    q_len: int,
    k_len: int,
    *,
    past: int = 0,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which keys each query may attend to: causal ∧ window ∧ same doc ∧ real key.

    Query t sits at index past + t of the key sequence. Returns bool (B|1, 1, T, S), True = attend.
    doc_ids (B, T) needs past == 0 (queries and keys are the same tokens);
    key_padding_mask (B, S) marks real keys, cached ones included.
    """
    q_idx = torch.arange(past, past + q_len, device=device)
    return visible_keys(q_idx, torch.arange(k_len, device=device), window=window, doc_ids=doc_ids,
                        key_padding_mask=key_padding_mask)


def visible_keys(q_idx: torch.Tensor, k_idx: torch.Tensor, *, window: int | None = None,
                 doc_ids: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``attention_mask`` for queries at key-sequence indices q_idx (T,) over keys k_idx (S,): bool
    (B|1, 1, T, S). Indices as tensors let a compiled decoding step keep one graph for every step."""
    q_idx, k_idx = q_idx[:, None], k_idx[None, :]
    mask = k_idx <= q_idx
    if window is not None:
        mask = mask & (q_idx - k_idx < window)
    mask = mask[None, None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].bool()
    return mask


def alibi_bias(slopes: torch.Tensor, q_len: int, k_len: int, past: int = 0) -> torch.Tensor:
    """-slope * distance for every (query, key) pair. Returns (1, H, T, S) float.

    Distances are key-sequence index differences; with left padding or packing these
    equal position differences wherever the mask lets a query see a key.
    """
    q_idx = torch.arange(past, past + q_len, device=slopes.device)
    return alibi_bias_at(slopes, q_idx, torch.arange(k_len, device=slopes.device))


def alibi_bias_at(slopes: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """``alibi_bias`` for queries at key-sequence indices q_idx (T,) over keys k_idx (S,): (1, H, T, S)."""
    return (slopes[:, None, None] * (k_idx[None, :] - q_idx[:, None])).unsqueeze(0)


def finish_mask(mask: torch.Tensor, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """The SDPA mask from a bool visibility mask: a query with no visible key (a left-pad token)
    would make softmax 0/0 = NaN, so it sees everything instead (junk nobody reads, but finite);
    with ALiBi, the bias with -inf where a key is hidden."""
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask if alibi is None else alibi.masked_fill(~mask, float("-inf"))


# --------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys and values of every layer, each (B, K, max_len, hd), plus a length pointer.

    A forward with the cache writes the new keys/values at [length, length+T) and
    attends over [0, length+T); the model advances ``length`` after its last layer.
    The cache also holds, for its decoding session, each layer's q/k/v and gate/up
    weights concatenated (see ``fused``): one matmul instead of two or three per token.

    Static mode (``columns`` set, used by ``Transformer.static_step``): the key columns to
    attend, 0 .. n-1, come as a tensor whose last T entries are where the new tokens go, so
    a compiled step reads its length as its one dynamic size and nothing else changes.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 *, device=None, dtype=None):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0
        self.columns: torch.Tensor | None = None
        """Static mode: arange(n) on the cache's device, n = cached + new tokens."""
        self._fused: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, hd) after the cached ones; return all keys/values so far (B, K, S, hd).

        Static mode: store them at the last T of ``columns`` and return the first n columns.
        """
        if self.columns is not None:
            n = self.columns.shape[0]
            self.k[layer].index_copy_(2, self.columns[n - k.shape[2]:], k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, self.columns[n - k.shape[2]:], v.to(self.v[layer].dtype))
            return self.k[layer][:, :, :n], self.v[layer][:, :, :n]
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot add {k.shape[2]} after {self.length}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def fused(self, *linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight (sum of outs, in) and bias of ``linears`` stacked, built on first use in this session.

        Decoding never changes the weights, so the copy stays valid while the cache lives.
        """
        key = id(linears[0])
        if key not in self._fused:
            self._fused[key] = stacked_weights(linears)
        return self._fused[key]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


# --------------------------------------------------------------------------- blocks


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm_type == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Attention(nn.Module):
    """Multi-head attention with shared key/value heads (mha: K=H, gqa: 1<K<H, mqa: K=1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, *, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, is_causal: bool,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). mask: bool or additive float (B|1, 1|H, T, S), or None with is_causal."""
        B, T, _ = x.shape
        H, K, hd = self.n_heads, self.n_kv_heads, self.head_dim
        # Decoding (a cache, eval, no gradients): one matmul for q, k and v, one rotation for q and k.
        # Training keeps three: fusing measured no faster there, and LoRA/quantized layers stay in charge.
        fused = cache is not None and not (self.training or torch.is_grad_enabled()) and fusable(
            self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        if fused:
            qkv = linear_no_grad(x, *cache.fused(self.q_proj, self.k_proj, self.v_proj)).view(B, T, H + 2 * K, hd)
            qk, v = qkv[:, :, :H + K].transpose(1, 2), qkv[:, :, H + K:].transpose(1, 2)
            if rope is not None:
                qk = apply_rope(qk, *rope)
            q, k = qk[:, :H], qk[:, H:]
        else:
            q = project(self.q_proj, x).view(B, T, H, hd).transpose(1, 2)
            k = project(self.k_proj, x).view(B, T, K, hd).transpose(1, 2)
            v = project(self.v_proj, x).view(B, T, K, hd).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
            if k.dtype != q.dtype:  # an fp32 cache under autocast
                k, v = k.to(q.dtype), v.to(q.dtype)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=K != H)
        y = y.transpose(1, 2).reshape(B, T, H * hd)
        if fused:
            return linear_no_grad(y, self.o_proj.weight)
        y = project(self.o_proj, y)
        return self.resid_dropout(y) if self.dropout else y


class MLP(nn.Module):
    """swiglu: down(silu(gate(x)) * up(x)); the others: down(act(up(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.activation == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=False)
        self.act = {"swiglu": F.silu, "silu": F.silu, "gelu": F.gelu, "relu": F.relu,
                    "leaky_relu": F.leaky_relu}[cfg.activation]
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D). Decoding (a cache, eval, no gradients): gate and up are one matmul."""
        if self.gated and cache is not None and not (self.training or torch.is_grad_enabled()) and fusable(
                self.gate_proj, self.up_proj, self.down_proj):
            gate, up = linear_no_grad(x, *cache.fused(self.gate_proj, self.up_proj)).chunk(2, dim=-1)
            return linear_no_grad(self.act(gate) * up, self.down_proj.weight)
        h = (self.act(project(self.gate_proj, x)) * project(self.up_proj, x) if self.gated
             else self.act(project(self.up_proj, x)))
        h = project(self.down_proj, h)
        return self.dropout(h) if self.dropout.p else h


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, *, cache: KVCache | None = None, **attn_kw) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache=cache, **attn_kw)
        return x + self.mlp(self.post_attention_layernorm(x), cache=cache)


# --------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """Decoder-only language model: token ids (B, T) -> next-token logits (B, T, V)."""

    gradient_checkpointing = False
    """True: recompute each block in the backward pass instead of storing its activations (training only)."""

    torch_compile = False
    """True: the training forward (whole sequences, no cache, gradients on) runs through torch.compile.
    On a 2-core CPU compiling takes ~18 s and each step gets ~5 % faster (5M params: 0.43 -> 0.41 s),
    so it pays after ~900 steps; decoding and no-grad evaluation stay eager (their shapes vary;
    ``generate(..., compile=True)`` compiles decoding steps on its own, see ``static_step``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positional_encoding == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._register_position_buffers(cfg)
        self.apply(self._init_module)
        # GPT-2: each residual branch adds to the stream n_layers*2 times; shrink
        # the projections into it so the stream's variance stays ~constant with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _register_position_buffers(self, cfg: ModelConfig) -> None:
        # Non-persistent: they are a pure function of the config, so checkpoints stay lean
        # and a changed table formula never conflicts with a saved one.
        if cfg.positional_encoding in ("rope", "yarn"):
            if cfg.positional_encoding == "yarn":
                freqs = yarn_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor,
                                         cfg.original_max_seq_len)
                scale = yarn_attention_scale(cfg.rope_scaling_factor)
            else:
                freqs, scale = rope_frequencies(cfg.head_dim, cfg.rope_theta), 1.0
            cos, sin = rope_tables(freqs, cfg.max_seq_len, scale)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        elif cfg.positional_encoding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_heads), persistent=False)
        elif cfg.positional_encoding == "sinusoidal":
            self.register_buffer("sinusoidal", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)

    @staticmethod
    def _init_module(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ---- public API

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V). See ``hidden_states`` for the arguments."""
        return self.lm_head(self.hidden_states(
            input_ids, position_ids=position_ids, doc_ids=doc_ids, key_padding_mask=key_padding_mask, cache=cache))

    def hidden_states(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                      doc_ids: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, D) of token ids (B, T).

        position_ids (B, T): defaults to past .. past+T-1 (past = cached tokens).
        doc_ids (B, T) int: packed documents; a token sees only earlier tokens of its own doc
            (pair with ``packed_position_ids(doc_ids)``). Not combinable with a cache.
        key_padding_mask (B, S) bool, True = real token, S = cached + new keys.
        cache: a KVCache from ``new_cache``; new keys/values are appended and its length advanced.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None and past + T > self.cfg.max_seq_len:
            raise LmforgeError(
                f"sequence of {past + T} tokens is longer than model.max_seq_len ({self.cfg.max_seq_len})")
        if doc_ids is not None and past:
            raise ValueError("doc_ids (packed documents) cannot be combined with a non-empty KV cache")
        if key_padding_mask is not None and key_padding_mask.shape != (B, past + T):
            raise ValueError(f"key_padding_mask must be (B, S) = {(B, past + T)}, got {tuple(key_padding_mask.shape)}")
        # Compiled graphs have no double backward: a forward that forces the math attention kernel is
        # building one (Sophia's Hessian steps, train.optim.forward_context), so it stays eager.
        if self.torch_compile and cache is None and torch.is_grad_enabled() and torch.backends.cuda.flash_sdp_enabled():
            return _compiled_trunk()(self, input_ids, position_ids, doc_ids, key_padding_mask)
        return self._trunk(input_ids, position_ids, doc_ids, key_padding_mask, cache)

    def _trunk(self, input_ids, position_ids, doc_ids, key_padding_mask, cache=None) -> torch.Tensor:
        """The body of ``hidden_states``, after its argument checks."""
        T = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        x = self.embed_tokens(input_ids)
        if self.cfg.positional_encoding in ("sinusoidal", "learned"):
            x = x + self._absolute_positions(position_ids, past, T)
        if self.cfg.dropout:  # skipping the no-op module call matters when decoding one token at a time
            x = self.drop(x)
        rope = self._rope(position_ids, past, T)
        mask, is_causal = self._mask(T, past, doc_ids, key_padding_mask, x.device)
        # Gradient checkpointing: keep only each block's input, recompute its inside during backward.
        remat = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            if remat:
                x = checkpoint(layer, x, use_reentrant=False, rope=rope, mask=mask, is_causal=is_causal, layer=i)
            else:
                x = layer(x, rope=rope, mask=mask, is_causal=is_causal, cache=cache, layer=i)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def static_step(self, input_ids: torch.Tensor, cache: KVCache, *, position_ids: torch.Tensor | None = None,
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, D) of new tokens (B, T) at the last T of ``cache.columns``.

        The decoding step written for torch.compile: the cache's length comes from the
        ``cache.columns`` tensor (n,) and positions and masks from tensors, never from a Python
        int that changes every step, so one graph (dynamic in n alone) serves every step.
        position_ids (B, T): default the new columns. key_padding_mask (B, >= n) bool, True = real key.
        Eval-time only: no dropout, no packed documents, no gradient checkpointing.
        """
        T = input_ids.shape[1]
        cols = cache.columns
        n = cols.shape[0]
        new = cols[n - T:]  # (T,)
        if position_ids is None:
            position_ids = new[None]
        x = self.embed_tokens(input_ids)
        pe = self.cfg.positional_encoding
        if pe in ("sinusoidal", "learned"):
            x = x + self._absolute_positions(position_ids, 0, T)
        rope = self._rope(position_ids, 0, T)
        # _mask's rules over tensor indices; one new token of an unpadded batch needs none.
        mask = None
        if T > 1 or self.cfg.window is not None or key_padding_mask is not None or pe == "alibi":
            mask = visible_keys(new, cols, window=self.cfg.window,
                                key_padding_mask=None if key_padding_mask is None else key_padding_mask[:, :n])
            mask = finish_mask(mask, alibi_bias_at(self.alibi_slopes, new, cols) if pe == "alibi" else None)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope=rope, mask=mask, is_causal=False, cache=cache, layer=i)
        return self.norm(x)

    def next_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Decoding's lm_head (no gradients): hidden states (B, D) -> logits (B, V) through the fast
        product of the fused projections when the head is a plain linear layer."""
        if fusable(self.lm_head) and not torch.is_grad_enabled():
            return linear_no_grad(h, self.lm_head.weight, self.lm_head.bias)
        return self.lm_head(h)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once). non_embedding drops the token/position tables,
        the usual N of scaling laws; an untied lm_head still counts (it costs compute)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if hasattr(self, "embed_positions"):
                n -= self.embed_positions.weight.numel()
        return n

    def new_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        """An empty KV cache for ``batch_size`` rows of up to ``max_len`` tokens (on the model's device/dtype by default)."""
        ref = self.embed_tokens.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.kv_heads, max_len, self.cfg.head_dim,
                       device=device or ref.device, dtype=dtype or ref.dtype)

    # ---- position and mask helpers

    def _absolute_positions(self, position_ids: torch.Tensor | None, past: int, T: int):
        """Additive position embedding (B|1, T, D) for sinusoidal/learned; 0 otherwise."""
        pe = self.cfg.positional_encoding
        if pe not in ("sinusoidal", "learned"):
            return 0
        table = self.sinusoidal if pe == "sinusoidal" else self.embed_positions.weight
        if position_ids is None:
            return table[past:past + T].unsqueeze(0)
        return table[position_ids]

    def _rope(self, position_ids: torch.Tensor | None, past: int, T: int):
        """cos, sin (B|1, 1, T, hd) for rope/yarn; None otherwise."""
        if self.cfg.positional_encoding not in ("rope", "yarn"):
            return None
        if position_ids is None:
            cos, sin = self.rope_cos[past:past + T][None], self.rope_sin[past:past + T][None]
        else:
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _mask(self, T: int, past: int, doc_ids, key_padding_mask, device):
        """(mask, is_causal) for scaled_dot_product_attention.

        The fast path (no mask, is_causal) covers plain causal attention over the whole
        sequence and single-token decoding; anything else gets one explicit mask.
        """
        S = past + T
        window = self.cfg.window if self.cfg.window is not None and self.cfg.window < S else None
        alibi = self.cfg.positional_encoding == "alibi"
        if not (alibi or window or doc_ids is not None or key_padding_mask is not None or (past and T > 1)):
            return None, past == 0
        if T == 1 and not (alibi or window or doc_ids is not None):
            mask = key_padding_mask[:, None, None, :].bool()  # one new token sees every earlier key but the pads
        else:
            mask = attention_mask(T, S, past=past, window=window, doc_ids=doc_ids,
                                  key_padding_mask=key_padding_mask, device=device)
        return finish_mask(mask, alibi_bias(self.alibi_slopes, T, S, past) if alibi else None), False


@functools.cache
def _compiled_trunk():
    """``Transformer._trunk`` through torch.compile, built on first use and shared by every model."""
    return torch.compile(Transformer._trunk)


# --------------------------------------------------------------------------- heads


def last_token_index(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row (works for right or left padding). (B, S) -> (B,)."""
    S = key_padding_mask.shape[-1]
    return S - 1 - key_padding_mask.long().flip(-1).argmax(dim=-1)


class RewardModel(nn.Module):
    """A transformer trunk with a scalar head read at each row's last real token."""

    def __init__(self, trunk: Transformer):
        super().__init__()
        self.trunk = trunk
        self.score_head = nn.Linear(trunk.cfg.d_model, 1)
        Transformer._init_module(self.score_head)

    def forward(self, input_ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), key_padding_mask (B, T) True = real -> scores (B,)."""
        h = _trunk_states(self.trunk, input_ids, key_padding_mask)
        if key_padding_mask is None:
            last = h[:, -1]
        else:
            last = h[torch.arange(h.shape[0], device=h.device), last_token_index(key_padding_mask)]
        return self.score_head(last).squeeze(-1)


class ValueModel(nn.Module):
    """A transformer trunk with a per-token scalar head (the PPO critic)."""

    def __init__(self, trunk: Transformer):
        super().__init__()
        self.trunk = trunk
        self.value_head = nn.Linear(trunk.cfg.d_model, 1)
        Transformer._init_module(self.value_head)

    def forward(self, input_ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), key_padding_mask (B, T) True = real -> values (B, T)."""
        return self.value_head(_trunk_states(self.trunk, input_ids, key_padding_mask)).squeeze(-1)


def _trunk_states(trunk: Transformer, input_ids: torch.Tensor, key_padding_mask: torch.Tensor | None):
    """Hidden states with positions counted over real tokens, so left- and right-padded rows both work."""
    if key_padding_mask is None:
        return trunk.hidden_states(input_ids)
    return trunk.hidden_states(input_ids, key_padding_mask=key_padding_mask,
                               position_ids=padded_position_ids(key_padding_mask))
