"""Back-of-the-envelope numbers for a model config, without building the model.

Parameter counts (exact), training memory, KV-cache size, FLOPs per token, the
Chinchilla-optimal token count and the wall time of a training stage on this
machine. ``summary`` formats them as the short text block that ``lmforge
inspect`` and the start of the pretrain stage print.

Notation as in ``lmforge.model``: V vocab, D d_model, L layers, H query heads,
K key/value heads, hd head dim, F MLP hidden size, B batch, T sequence length.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge import kernels
from lmforge.config import load_config
from lmforge.device import resolve_device, set_threads
from lmforge.errors import LmforgeError
from lmforge.hf_config import model_config_from_hf, read_hf_config
from lmforge.loader import read_checkpoint
from lmforge.model import ModelConfig

BYTES = {"fp32": 4, "bf16": 2}

# Share of the measured matmul throughput a training step reaches (model FLOPs utilisation).
# CPU: the peer Llama baseline in the design notes trains at ~55% of fp32 matmul peak; a GPU
# step has more kernel launches and memory-bound ops (norms, softmax, optimizer) per FLOP.
MFU = {"cpu": 0.5, "cuda": 0.4}

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal data ~ 20 tokens per parameter


# --------------------------------------------------------------------------- parameters


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of ``Transformer(cfg)``, in ``named_parameters()`` order.

    A tied lm_head is the embedding itself, so it appears once (as ``embed_tokens.weight``).
    """
    D, V, F = cfg.d_model, cfg.vocab_size, cfg.ff_dim
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim

    def norm(prefix: str) -> dict:
        return {f"{prefix}.weight": (D,), **({f"{prefix}.bias": (D,)} if cfg.norm_type == "layernorm" else {})}

    shapes = {"embed_tokens.weight": (V, D)}
    if cfg.positional_encoding == "learned":
        shapes["embed_positions.weight"] = (cfg.max_seq_len, D)
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        shapes.update(norm(f"{p}.input_layernorm"))
        for name, out in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            shapes[f"{p}.self_attn.{name}.weight"] = (out, D)
            if cfg.attention_bias:
                shapes[f"{p}.self_attn.{name}.bias"] = (out,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (D, q_dim)
        shapes.update(norm(f"{p}.post_attention_layernorm"))
        if cfg.activation == "swiglu":
            shapes[f"{p}.mlp.gate_proj.weight"] = (F, D)
        shapes[f"{p}.mlp.up_proj.weight"] = (F, D)
        shapes[f"{p}.mlp.down_proj.weight"] = (D, F)
    shapes.update(norm("norm"))
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


@dataclass
class ParamCounts:
    total: int
    """Every parameter, a tied embedding/head once (= ``Transformer.num_params()``)."""
    embedding: int
    """Token (and learned position) tables."""

    @property
    def non_embedding(self) -> int:
        """The N of scaling laws (= ``num_params(non_embedding=True)``); an untied lm_head counts."""
        return self.total - self.embedding


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Exact counts from the shapes: in closed form, with n = D (rmsnorm) or 2D (layernorm),

    total = V·D·(2 - tied) + [T_max·D if learned] + n
            + L·(D·hd·(2H + 2K) + [(H + 2K)·hd if attention_bias] + (3 if swiglu else 2)·D·F + 2n)
    """
    shapes = param_shapes(cfg)
    total = sum(math.prod(s) for s in shapes.values())
    embedding = sum(math.prod(shapes[k]) for k in ("embed_tokens.weight", "embed_positions.weight") if k in shapes)
    return ParamCounts(total=total, embedding=embedding)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that multiply activations: every Linear, the head (tied or not) included; not the
    position table, norms or biases. The N of the 6N FLOPs rule."""
    return sum(math.prod(s) for name, s in param_shapes(cfg).items()
               if len(s) == 2 and name != "embed_positions.weight")


# --------------------------------------------------------------------------- memory


def optimizer_state_bytes(cfg: ModelConfig, optimizer: str = "adamw") -> int:
    """Bytes of optimizer state for the optimizers of ``lmforge.train.optim`` (fp32 unless said).

    adamw      exp_avg + exp_avg_sq (2 per parameter) + a step scalar per tensor
    adafactor  factored second moment: rows + cols per matrix, a full one per vector, + a step scalar
    lion       exp_avg (1 per parameter)
    sophia     momentum + hessian moment + the last Hessian estimate (3 per parameter)
    muon       a momentum buffer (1) for hidden matrices; AdamW's two moments for the
               embedding, head, norms and biases
    adamw8bit  bitsandbytes' defaults: two 8-bit moments plus an fp32 absmax per 256-element
               block for tensors of >= 4096 elements; smaller tensors keep two fp32 moments
    """
    sizes = {name: (math.prod(s), s) for name, s in param_shapes(cfg).items()}
    if optimizer == "adamw":
        elements = sum(2 * n + 1 for n, _ in sizes.values())
    elif optimizer == "adafactor":
        elements = sum((sum(s[-2:]) if len(s) >= 2 else n) + 1 for n, s in sizes.values())
    elif optimizer == "lion":
        elements = sum(n for n, _ in sizes.values())
    elif optimizer == "sophia":
        elements = sum(3 * n for n, _ in sizes.values())
    elif optimizer == "muon":
        elements = sum((1 if len(s) == 2 and not name.startswith(("embed_", "lm_head")) else 2) * n
                       for name, (n, s) in sizes.items())
    elif optimizer == "adamw8bit":
        return sum(2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n for n, _ in sizes.values())
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    return 4 * elements


def _saved_bytes_per_token(cfg: ModelConfig, dtype: str) -> tuple[int, int]:
    """Bytes autograd keeps per token for the backward pass: (per layer, outside the layers).

    Counted with saved-tensor hooks on torch 2.13 (CPU, fused attention kernel): exact in fp32
    and under CPU bf16 autocast. CUDA was not measured; its autocast casts these ops alike, but a
    fused CUDA rmsnorm may keep D bytes less per norm than the composite CPU one.
      each norm keeps its input and statistics (fp32 under autocast too): rmsnorm x, x/rms,
      1/rms (2D+1), layernorm x, mean, 1/std (D+2); its output is kept once in fp32, while
      under autocast every Linear keeps its own bf16 copy (q, k, v; gate, up; lm_head);
      attention keeps q and k after rope, v, its output (also o_proj's input) and the fp32
      log-sum-exp: (2H + 2K)·hd + H, no T×T matrix;
      the MLP keeps gate, silu(gate), up, their product (swiglu, 4F); up and act(up) (2F);
      relu's output only (F);
      outside the layers: input and target ids (16 bytes) and the final norm.
    """
    D, H, K, hd, F = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim
    act = BYTES[dtype]
    norm_kept = 4 * (2 * D + 1) if cfg.norm_type == "rmsnorm" else 4 * (D + 2)  # input + statistics

    def norm_out(consumers: int) -> int:
        return 4 * D if dtype == "fp32" else 2 * D * consumers

    mlp = {"swiglu": 4 * F, "relu": F}.get(cfg.activation, 2 * F)
    gated = 2 if cfg.activation == "swiglu" else 1
    attention = act * ((2 * H + 2 * K) * hd) + 4 * H
    layer = 2 * norm_kept + norm_out(3) + norm_out(gated) + attention + act * mlp
    outside = 16 + norm_kept + norm_out(1)
    return layer, outside


def _mask_bytes(cfg: ModelConfig, seq_len: int, dtype: str) -> int:
    """Float attention masks kept for backward: ALiBi's bias (1, H, T, T) once per forward; a
    sliding window's boolean mask is turned into a float (1, 1, T, T) by every layer's attention."""
    if cfg.positional_encoding == "alibi":
        return BYTES[dtype] * cfg.n_heads * seq_len * seq_len
    if cfg.window is not None and cfg.window < seq_len:
        return BYTES[dtype] * cfg.n_layers * seq_len * seq_len
    return 0


def _loss_bytes(cfg: ModelConfig, tokens: int, dtype: str, fused: bool) -> int:
    """Bytes of the output layer and the loss at their peak, for ``tokens`` = B·T predictions.

    fused (``lmforge.kernels.linear_cross_entropy``, what ``lm_loss`` uses): the forward already
      computes both gradients and keeps them: the hidden states' (B·T·D, activation dtype) and
      the head weight's (V·D, accumulated in fp32), while one chunk of rows·V fp32 logits and
      their log-softmax exist at a time;
    unfused (``F.cross_entropy`` on (B, T, V) logits): 12·B·T·V, the loss's saved fp32
      log-probabilities, their gradient and the logits' gradient alive together as backward starts.
    """
    V, D = cfg.vocab_size, cfg.d_model
    if not fused:
        return 12 * tokens * V
    rows = min(tokens, max(1, kernels.CHUNK_ELEMENTS // V))
    return BYTES[dtype] * tokens * D + 4 * V * D + 8 * rows * V


@dataclass
class MemoryEstimate:
    """Bytes of one training step's peak, by kind."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    loss: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.loss


def training_memory(cfg: ModelConfig, *, batch_size: int, seq_len: int | None = None,
                    optimizer: str = "adamw", dtype: str = "fp32", gradient_checkpointing: bool = False,
                    fused_loss: bool = True) -> MemoryEstimate:
    """Memory to train ``cfg`` on (batch_size, seq_len) micro-batches, dropout 0, one process.

    weights      4·P (fp32 master weights); bf16 adds 2 bytes per matmul weight for the
                 bf16 copies autocast caches and backward keeps
    grads        4·P (gradients are fp32 like the weights)
    optimizer    ``optimizer_state_bytes``
    activations  B·T·(L·layer + outside) + masks, with the per-token bytes of
                 ``_saved_bytes_per_token``; gradient checkpointing keeps only each block's
                 fp32 input (4·D per token and layer) plus one block recomputed at a time:
                 B·T·(L·4·D + layer + outside)
    loss         ``_loss_bytes``: the fused loss of pretraining, or 12·B·T·V for full logits

    ``total`` adds everything, an upper bound: in a real step the gradients fill in while
    the activations are freed, so the peak is lower by up to the gradients' share.
    Sophia's Hessian steps (a double backward) and LoRA are not modelled.
    dtype: "fp32" (CPU) or "bf16" (CUDA autocast, as ``lmforge.device.autocast``).
    """
    if dtype not in BYTES:
        raise ValueError(f"dtype must be one of {', '.join(BYTES)}, got {dtype!r}")
    T = seq_len or cfg.max_seq_len
    tokens = batch_size * T
    P = param_counts(cfg).total
    layer, outside = _saved_bytes_per_token(cfg, dtype)
    per_token = (cfg.n_layers * 4 * cfg.d_model + layer if gradient_checkpointing else cfg.n_layers * layer) + outside
    return MemoryEstimate(
        weights=4 * P + (2 * matmul_params(cfg) if dtype == "bf16" else 0),
        grads=4 * P,
        optimizer=optimizer_state_bytes(cfg, optimizer),
        activations=tokens * per_token + _mask_bytes(cfg, T, dtype),
        loss=_loss_bytes(cfg, tokens, dtype, fused_loss),
    )


def kv_cache_bytes(cfg: ModelConfig, *, batch_size: int = 1, seq_len: int | None = None,
                   dtype: str = "fp32") -> int:
    """Keys and values of every layer for batch_size × seq_len tokens: 2·L·B·T·K·hd·bytes."""
    T = seq_len or cfg.max_seq_len
    return 2 * cfg.n_layers * batch_size * T * cfg.kv_heads * cfg.head_dim * BYTES[dtype]


# --------------------------------------------------------------------------- compute


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, *, training: bool = True,
                    gradient_checkpointing: bool = False) -> int:
    """Matmul FLOPs per token: 6N + 12·L·H·hd·T for a training step, 2N + 4·L·H·hd·T forward only.

    The PaLM paper's count (Chowdhery et al. 2022, appendix B): N matmul weights
    (``matmul_params``) cost 2 FLOPs each forward and 4 backward; attention's QKᵀ and
    AV cost 2·2·H·hd·T per token and layer forward, 3x that with backward. T is the
    full sequence length (no discount for the causal mask or a sliding window). Gradient
    checkpointing runs the blocks' forward twice: 8N + 16·L·H·hd·T, less the head's 2·V·D.
    """
    T = seq_len or cfg.max_seq_len
    attention = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
    n = matmul_params(cfg)
    forward = 2 * n + attention
    if not training:
        return forward
    recompute = forward - 2 * cfg.vocab_size * cfg.d_model if gradient_checkpointing else 0
    return 3 * forward + recompute


def chinchilla_tokens(cfg: ModelConfig) -> int:
    """Compute-optimal training tokens: 20 per parameter (Hoffmann et al. 2022)."""
    return CHINCHILLA_TOKENS_PER_PARAM * param_counts(cfg).total


def stage_tokens(train, seq_len: int) -> int:
    """Tokens a training stage consumes: max_steps · batch_size · grad_accum_steps · seq_len.

    ``train``: a ``TrainConfig`` or a config section dict (grad_accum_steps defaults to 1).
    """
    return _get(train, "max_steps") * _get(train, "batch_size") * (_get(train, "grad_accum_steps", 1) or 1) * seq_len


def _get(train, key: str, default=None):
    """A training knob from a TrainConfig or a config section dict."""
    return train.get(key, default) if isinstance(train, dict) else getattr(train, key, default)


def precision(device) -> str:
    """The training precision on a device: bf16 autocast on CUDA, fp32 elsewhere (see lmforge.device)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


@functools.lru_cache(maxsize=None)
def _measure(device: str, threads: int, seconds: float) -> float:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n = 8192 if dev.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    a @ b  # warm-up: kernel selection, thread pool start
    sync()
    # The fastest of repeated single matmuls: on a shared machine the mean mostly measures the neighbours.
    best, start = math.inf, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def matmul_flops_per_s(device="cpu", seconds: float = 0.2) -> float:
    """Matmul throughput (FLOP/s) of ``device`` in the precision training uses there (fp32 on
    CPU, bf16 on CUDA): the fastest of the square matmuls (n = 1024 CPU, 8192 CUDA) that fit in
    ``seconds``. Timed once per process and thread count."""
    return _measure(str(torch.device(device)), torch.get_num_threads(), seconds)


def stage_seconds(cfg: ModelConfig, train, *, seq_len: int | None = None, flops_per_s: float,
                  mfu: float) -> float:
    """Training-step time of a stage: flops_per_token · tokens / (flops_per_s · mfu); eval not included.

    A compute-bound figure: models so small that per-operation overheads dominate (d_model
    below ~128 on CPU) take longer.
    """
    T = seq_len or cfg.max_seq_len
    remat = bool(_get(train, "gradient_checkpointing", False))
    return flops_per_token(cfg, T, gradient_checkpointing=remat) * stage_tokens(train, T) / (flops_per_s * mfu)


# --------------------------------------------------------------------------- text


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_count(n: float) -> str:
    """1234567 -> '1.23 M'."""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g}"


def format_seconds(s: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.2g} s"


def summary(cfg: ModelConfig, train=None, *, stage: str = "pretrain", device="cpu",
            batch_size: int | None = None, flops_per_s: float | None = None, fused_loss: bool = True) -> str:
    """The estimates as a short text block, for sequences of ``cfg.max_seq_len`` tokens.

    train: the stage's config section dict or TrainConfig (batch size, optimizer, steps,
    gradient_checkpointing); None gives memory for ``batch_size`` (default 1) with AdamW and no
    time line. device: where training would run (its precision and matmul speed).
    flops_per_s: the device's matmul throughput; None measures it (a fraction of a second).
    fused_loss: the stage's loss is ``lm_loss``'s fused cross-entropy (pretraining), not full logits.
    """
    T, dtype, dev = cfg.max_seq_len, precision(device), torch.device(device)
    batch = batch_size or (_get(train, "batch_size") if train else 1)
    optimizer = _get(train, "optimizer", "adamw") if train else "adamw"
    remat = bool(_get(train, "gradient_checkpointing", False)) if train else False
    counts = param_counts(cfg)
    mem = training_memory(cfg, batch_size=batch, seq_len=T, optimizer=optimizer, dtype=dtype,
                          gradient_checkpointing=remat, fused_loss=fused_loss)
    kv = "mha" if cfg.kv_heads == cfg.n_heads else f"{cfg.kv_heads} kv"
    lines = [
        f"model        {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads ({kv}, head dim "
        f"{cfg.head_dim}), d_ff {cfg.ff_dim} {cfg.activation}, {cfg.positional_encoding}, {cfg.norm_type}, "
        f"vocab {cfg.vocab_size}, context {T}{', tied' if cfg.tie_embeddings else ''}",
        f"parameters   {counts.total / 1e6:.2f} M ({counts.total:,}): {counts.non_embedding / 1e6:.2f} M "
        f"non-embedding, {counts.embedding / 1e6:.2f} M embedding",
        f"flops/token  {format_count(flops_per_token(cfg, T))} train (6N + 12·L·H·hd·T, N = "
        f"{matmul_params(cfg) / 1e6:.2f} M matmul weights), "
        f"{format_count(flops_per_token(cfg, T, training=False))} forward",
        f"chinchilla   {format_count(chinchilla_tokens(cfg))} tokens (20 × parameters)",
        f"kv cache     {format_bytes(kv_cache_bytes(cfg, dtype=dtype))} per sequence of {T} tokens ({dtype})",
        f"memory       {format_bytes(mem.total)} to train with {optimizer}, batch {batch} × {T}, {dtype}"
        f"{', gradient checkpointing' if remat else ''}: weights {format_bytes(mem.weights)}, grads "
        f"{format_bytes(mem.grads)}, optimizer {format_bytes(mem.optimizer)}, activations "
        f"{format_bytes(mem.activations)}, loss {format_bytes(mem.loss)}",
    ]
    if train:
        rate = flops_per_s or matmul_flops_per_s(dev)
        mfu = MFU.get(dev.type, MFU["cuda"])
        tokens, optimal = stage_tokens(train, T), chinchilla_tokens(cfg)
        secs = stage_seconds(cfg, train, seq_len=T, flops_per_s=rate, mfu=mfu)
        lines.append(
            f"time         ~{format_seconds(secs)} for {stage}'s {format_count(tokens)} tokens "
            f"({_get(train, 'max_steps')} steps × {batch} × {T} × {_get(train, 'grad_accum_steps', 1) or 1}, "
            f"{100 * tokens / optimal:.2g}% of chinchilla) on {dev}: {format_count(rate)}FLOP/s {dtype} matmul "
            f"measured × MFU {mfu}")
    return "\n".join(lines)


def describe(path, *, device: str | None = None, flops_per_s: float | None = None) -> str:
    """``summary`` of a pipeline config (YAML: the model and pretrain sections) or of a model checkpoint.

    device: where to time training (default: the config's ``device``, else auto).
    Raises LmforgeError naming the file when it is missing or neither a config nor a checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"inspect: no such file: {path}")
    if path.suffix in (".yaml", ".yml"):
        config = load_config(path)
        set_threads(config.get("threads"))  # the pretrain stage's threads, so the timing matches it
        cfg = _config_model(config["model"], path)
        train, source = config["pretrain"], f"{path} (model + pretrain sections)"
        dev = resolve_device(device or config.get("device", "auto"))
    else:
        if path.is_dir() and not (path / "config.json").exists():
            raise LmforgeError(f"inspect: {path} is a folder, not a config (.yaml) or a checkpoint (.pt)")
        ckpt = read_checkpoint(path)
        cfg = ModelConfig.from_dict(ckpt["model_config"])
        meta = ckpt.get("meta") or {}
        train, source = None, f"{path} ({ckpt.get('kind', 'causal_lm')} checkpoint, stage {meta.get('stage', '?')})"
        dev = resolve_device(device or "auto")
    return f"{source}\n" + summary(cfg, train, device=dev, flops_per_s=flops_per_s)


def _config_model(model: dict, path) -> ModelConfig:
    """The model section's architecture; with ``init_from`` that of the imported folder's config.json."""
    init_from = model.get("init_from")
    if not init_from:
        return ModelConfig.from_section(model)
    folder = Path(init_from.removeprefix("hf:")).expanduser()
    if not folder.is_dir():
        raise LmforgeError(f"{path}: model.init_from {init_from!r} is not a local folder; "
                           f"download it and inspect the folder")
    return model_config_from_hf(read_hf_config(folder), str(folder / "config.json"))
