"""LoRA and QLoRA: low-rank adapters on the frozen linear layers of a Transformer.

``apply_lora(model, cfg)`` freezes every weight of a Transformer and wraps the
linear layers named in ``cfg.target_modules`` (q_proj, k_proj, v_proj, o_proj,
gate_proj, up_proj, down_proj) in ``LoRALinear``: y = W x + (alpha / r) B A x, with
A (r, in) random and B (out, r) zero, so training starts from the base model
exactly. With ``quantize: nf4`` the base's matrices are first stored in 4-bit
NF4 (``lmforge.quant``): QLoRA; the adapters stay float32.

- ``adapters_disabled(model)`` (a context manager) runs the base alone, and
  ``BaseView(model)`` is that as a frozen model object: the DPO/PPO/GRPO
  reference of a LoRA policy, without a second copy of the weights.
- ``adapter_state(model)`` is what a LoRA stage saves: the adapter tensors and
  any module the base did not have (a fresh reward or value head), nothing else.
  ``lmforge.loader`` writes it as a ``kind: lora`` checkpoint that names its
  base by path and sha256, and its ``load_model`` on such a file rebuilds base +
  adapters (``build_adapted``), so every consumer of a model file takes either.
  This module is the nn code alone: it reads and writes no files.
- ``merge_lora(model)`` folds the adapters into plain ``nn.Linear`` weights
  (dequantizing a QLoRA base): the ``lmforge merge`` command.

Why in-house and not ``peft`` (0.21, installable here with torch 2.13, and it
does wrap this model cleanly through its custom-model path): peft is an optional
dependency of the ``hf`` extra (it imports transformers: ~2.4 s per process);
its wrapper renames every key (``base_model.model.…``) and moves attribute
access behind ``__getattr__``; its 4-bit path is bitsandbytes' ``Linear4bit``,
which is CUDA-first; and its save format (adapter_config.json + safetensors) is
not our checkpoint, which must carry the base's sha256 and rebuild through
``load_model``. What we need fits in this one module.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.quant import NF4Linear, dequantize_model, is_quantized, quantize_model
from lmforge.sections import LoraConfig  # the lora: section, checked torch-free at config time


# --------------------------------------------------------------------------- the adapter layer


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(dropout(x)))`` around a frozen linear layer (nn.Linear or NF4Linear).

    x (..., in) -> (..., out). ``lora_A`` (r, in) starts like nn.Linear's weights,
    ``lora_B`` (out, r) at zero: the wrapped layer starts as the base exactly.
    """

    def __init__(self, base: nn.Module, *, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.scale = r, alpha / r
        device = next(t for t in [*base.parameters(), *base.buffers()]).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def delta(self) -> torch.Tensor:
        """The weight update (alpha / r) B A, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (out, in), for code that reads ``.weight`` of a linear layer."""
        w = self.base.weight
        return w + self.delta().to(w.dtype) if self.enabled else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return y + update.to(y.dtype) * self.scale

    def merged(self) -> nn.Linear:
        """A plain float32 nn.Linear computing the same function (the adapter folded in)."""
        w = self.base.weight.detach().float()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device)
        with torch.no_grad():
            out.weight.copy_(w + self.delta().float())
            if self.bias is not None:
                out.bias.copy_(self.bias.float())
        return out.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}"


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def has_adapters(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def lora_config_of(model: nn.Module) -> LoraConfig | None:
    """The LoraConfig ``apply_lora`` put on (a submodule of) ``model``, or None."""
    for m in model.modules():
        cfg = getattr(m, "lora_config", None)
        if cfg is not None:
            return cfg
    return None


# --------------------------------------------------------------------------- apply / merge


def _in_blocks(name: str) -> bool:
    """True for a module path inside the transformer blocks (``layers.N.…``)."""
    return "layers" in name.split(".")


def linear_names(model: nn.Module) -> list[str]:
    """Short names of the linear layers inside the blocks (what ``target_modules`` may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (nn.Linear, NF4Linear)) and _in_blocks(name)})


def apply_lora(model: nn.Module, cfg: LoraConfig, *, key: str = "lora") -> nn.Module:
    """Turn a Transformer into a LoRA (or, with ``cfg.quantize``, QLoRA) model in place; returns it.

    A model that already carries adapters (a LoRA checkpoint trained further) has
    them folded into its weights first: the new adapters start from that model.
    Afterwards only the adapter tensors require gradients.
    """
    if has_adapters(model) or is_quantized(model):
        merge_lora(model)
    available = linear_names(model)
    missing = [t for t in cfg.target_modules if t not in available]
    if missing:
        verb = "matches" if len(missing) == 1 else "match"
        raise LmforgeError(f"config key '{key}.target_modules': {', '.join(repr(m) for m in missing)} {verb} "
                           f"no linear layer of the model (available: {', '.join(available)})")
    if cfg.quantize == "nf4":
        quantize_model(model, double_quant=cfg.double_quant)
    model.requires_grad_(False)
    for name, parent in list(model.named_modules()):
        if not _in_blocks(name):
            continue
        for child_name, child in list(parent.named_children()):
            if child_name in cfg.target_modules and isinstance(child, (nn.Linear, NF4Linear)):
                setattr(parent, child_name, LoRALinear(child, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout))
    model.lora_config = cfg
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer and dequantize an NF4 base, in place: a plain float32
    model computing what the adapted one did. Parameters stay frozen. Returns ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    dequantize_model(model)
    for m in model.modules():
        if getattr(m, "lora_config", None) is not None:
            m.lora_config = None
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block ``model`` computes its base alone (every LoRALinear skips its update)."""
    layers = lora_layers(model)
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.enabled = was


class BaseView:
    """A LoRA model with its adapters off, as a frozen model: no gradients, eval mode, same weights.

    Quacks like the frozen reference modules DPO/PPO/GRPO use (``__call__``, ``cfg``,
    ``eval()``, ``train()``, ``training``), but holds no weights of its own, so it
    costs no memory. It is deliberately not an ``nn.Module``: registering it in a
    module tree would list the policy's parameters twice.
    """

    training = False

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def cfg(self):
        return self.model.cfg

    def __call__(self, *args, **kwargs):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), adapters_disabled(self.model):
                return self.model(*args, **kwargs)
        finally:
            self.model.train(was_training)

    def hidden_states(self, *args, **kwargs):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), adapters_disabled(self.model):
                return self.model.hidden_states(*args, **kwargs)
        finally:
            self.model.train(was_training)

    def eval(self) -> "BaseView":
        return self

    def train(self, mode: bool = True) -> "BaseView":
        return self  # a reference is always evaluated in eval mode

    def requires_grad_(self, requires_grad: bool = True) -> "BaseView":
        return self

    def to(self, *args, **kwargs) -> "BaseView":
        return self


# --------------------------------------------------------------------------- adapter tensors


def adapted_prefix(model: nn.Module) -> str:
    """State-dict prefix of the adapted Transformer inside ``model`` ('' or e.g. 'trunk.')."""
    for name, m in model.named_modules():
        if getattr(m, "lora_config", None) is not None:
            return f"{name}." if name else ""
    raise ValueError("the model has no LoRA adapters (apply_lora was not called on it)")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint stores: the adapters, and every tensor outside the adapted base
    (a reward model's fresh score head, say). The base's own weights are left out. CPU copies."""
    prefix = adapted_prefix(model)
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()
            if not k.startswith(prefix) or ".lora_A" in k or ".lora_B" in k}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str | Path) -> None:
    """Load ``adapter_state`` output into a model built by ``apply_lora``; a key the model lacks,
    or a tensor of another shape, is an error naming ``source``."""
    own = model.state_dict()
    wrong = [k for k in state if k not in own or own[k].shape != state[k].shape]
    expected = set(adapter_state(model))
    absent = sorted(expected - set(state))
    if wrong or absent:
        detail = (f"unexpected or mis-shaped tensors {wrong[:4]}" if wrong else f"missing tensors {absent[:4]}")
        raise LmforgeError(f"{source}: the adapters do not fit the base model ({detail}); "
                           f"was it trained on another base?")
    model.load_state_dict(state, strict=False)
