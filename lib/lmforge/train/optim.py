"""Optimizers and learning-rate schedules for every gradient-based stage.

One entry point per concern:

- ``build_optimizer(model, name=..., lr=...)`` returns ONE ``torch.optim.Optimizer``
  whatever the algorithm, so the training loop checkpoints, resumes and schedules
  them all the same way.
- ``build_scheduler(optimizer, name=..., ...)`` returns a ``LambdaLR`` driven by the
  pure function ``lr_factor`` (linear warmup, then a decay to ``min_lr_ratio``).

Implementations and what ``lr`` means for each:

=========  ===========================================  =================================
name       implementation                               typical ``lr``
=========  ===========================================  =================================
adamw      ``torch.optim.AdamW`` (fused when possible)  3e-4 … 1e-3
adafactor  ``torch.optim.Adafactor``                    1e-2 (relative: scaled by RMS(param))
lion       ``pytorch_optimizer.Lion``                   3–10× smaller than AdamW
sophia     ``pytorch_optimizer.SophiaH``                ~6e-2 (per-element step ≤ lr · p, p=1e-2)
muon       ``pytorch_optimizer.Muon`` (AdamW fallback)  same as AdamW (Moonlight lr scaling)
adamw8bit  ``bitsandbytes.optim.AdamW8bit`` (CUDA only) same as AdamW (8-bit moments)
=========  ===========================================  =================================

Sophia estimates the Hessian diagonal from the gradient's graph, so the loop must
run the forward under ``forward_context(optimizer)`` (math attention kernel), call
``backward(loss, optimizer)`` — i.e. ``loss.backward(create_graph=hessian_due(optimizer))``
— and ``optimizer.zero_grad(set_to_none=True)`` after each step (see ``hessian_due``).
For the other optimizers these helpers are a plain forward and ``loss.backward()``.

Resume order: build the optimizer, build the scheduler, THEN load both state dicts.
(A scheduler built after loading would overwrite the restored learning rate.)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmforge.errors import LmforgeError

OPTIMIZERS = ("adamw", "adafactor", "lion", "sophia", "muon", "adamw8bit")
SCHEDULERS = ("none", "cosine", "linear", "polynomial")

# Constructor arguments that build_optimizer sets itself (never through ``extra``).
_RESERVED = ("params", "lr", "weight_decay")


# --------------------------------------------------------------------------- parameter groups


def param_groups(
    model: nn.Module, weight_decay: float, params: Iterable[nn.Parameter] | None = None
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and an undecayed group (nanoGPT rule).

    Tensors with ``ndim >= 2`` (weight matrices, embeddings) decay; 1-D tensors
    (norm gains, biases) do not: shrinking a gain or a bias toward zero does not
    regularise, it only fights the normalisation.

    Each group carries a ``"name"`` ("decay" / "no_decay") for logging. Frozen
    parameters are left out; an empty group is dropped. Tied weights appear once.
    ``params`` restricts the groups to those parameters of ``model`` (e.g. a head).
    """
    decay, no_decay = [], []
    for _, p in _trainable(model, params):
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def muon_param_groups(
    model: nn.Module, weight_decay: float, params: Iterable[nn.Parameter] | None = None
) -> list[dict[str, Any]]:
    """Groups for Muon: 2-D hidden matrices orthogonalised, everything else on AdamW.

    Muon's orthogonalised update suits the hidden linear maps only. Embeddings and
    output heads are lookups / classifiers whose rows must move independently, and
    1-D tensors are not matrices at all, so those go to the AdamW fallback
    (``use_muon=False``), with the nanoGPT weight-decay rule inside it. A module
    counts as an embedding by type (``nn.Embedding``) or by a name containing
    "embed"; as a head by a name ending in "head" (lm_head, value_head, …).
    """
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    muon, adamw_decay, adamw_no_decay = [], [], []
    for name, p in _trainable(model, params):
        if p.ndim < 2:
            adamw_no_decay.append(p)
        elif id(p) in embedding_ids or _is_embedding_or_head(name) or p.ndim != 2:
            adamw_decay.append(p)
        else:
            muon.append(p)
    groups = [
        {"name": "muon", "params": muon, "weight_decay": weight_decay, "use_muon": True},
        {"name": "adamw_decay", "params": adamw_decay, "weight_decay": weight_decay, "use_muon": False},
        {"name": "adamw_no_decay", "params": adamw_no_decay, "weight_decay": 0.0, "use_muon": False},
    ]
    return [g for g in groups if g["params"]]


def _trainable(model: nn.Module, only: Iterable[nn.Parameter] | None = None) -> list[tuple[str, nn.Parameter]]:
    """Named trainable parameters (within ``only`` if given); a tied tensor is listed once."""
    keep = None if only is None else {id(p) for p in only}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and (keep is None or id(p) in keep)]


def _is_embedding_or_head(name: str) -> bool:
    """True for names like ``tok_embed.weight``, ``lm_head.weight``, ``value_head.weight``."""
    modules = name.split(".")[:-1]
    return any("embed" in part or part.endswith("head") for part in modules)


# --------------------------------------------------------------------------- optimizers


def build_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] | None = (0.9, 0.95),
    eps: float = 1e-8,
    key: str = "train.optimizer",
    params: Iterable[nn.Parameter] | None = None,
    **extra: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` over ``model``'s trainable parameters (or ``params``).

    Build it after ``model.to(device)``: AdamW picks its fused kernel from the
    parameters' device. ``weight_decay`` is decoupled (AdamW-style) everywhere and
    follows ``param_groups``' rule. ``betas`` is used by adamw, lion, sophia and
    muon's AdamW part (``None`` = each library's own default); adafactor has no
    betas. ``eps`` is Adam's denominator term, so only adamw and muon's AdamW part
    use it. ``params`` restricts training to those parameters of ``model`` (names
    and module types still come from ``model``). ``extra`` goes to the
    implementation's constructor (e.g. ``momentum`` for muon, ``update_period`` or
    ``p`` for sophia, ``beta2_decay`` for adafactor, ``fused=False`` for adamw).

    Raises:
        LmforgeError: unknown ``name``, an ``extra`` option the implementation does
            not accept, or a negative ``lr`` / ``weight_decay``; the message names ``key``.
    """
    if name not in _BUILDERS:
        raise LmforgeError(f"{key}: unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
    if not lr > 0:
        raise LmforgeError(f"{key}: lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise LmforgeError(f"{key}: weight_decay must be >= 0, got {weight_decay}")
    params = None if params is None else list(params)
    if not _trainable(model, params):
        raise LmforgeError(f"{key}: the model has no trainable parameters")
    split = muon_param_groups if name == "muon" else param_groups
    groups = split(model, weight_decay, params)
    return _BUILDERS[name](groups, lr, betas, eps, key, extra)


# Each builder takes the param groups and the shared hyperparameters it uses.


def _adamw(groups, lr, betas, eps, key, extra) -> torch.optim.Optimizer:
    kwargs = _options(torch.optim.AdamW, "adamw", key, extra, lr=lr, eps=eps, **_betas(betas))
    if "fused" in kwargs or "foreach" in kwargs:
        return torch.optim.AdamW(groups, **kwargs)
    try:
        # The fused kernel is several times faster than foreach on CPU and CUDA alike.
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except RuntimeError:  # a device or dtype without a fused kernel
        return torch.optim.AdamW(groups, **kwargs)


def _adafactor(groups, lr, betas, eps, key, extra) -> torch.optim.Optimizer:
    kwargs = _options(torch.optim.Adafactor, "adafactor", key, extra, lr=lr)
    return torch.optim.Adafactor(groups, **kwargs)


# pytorch_optimizer is imported where one of its optimizers is built: importing it pulls in
# transformers and torch.distributed.tensor, ~1.3 s of every stage's start-up otherwise.
def _lion(groups, lr, betas, eps, key, extra) -> torch.optim.Optimizer:
    from pytorch_optimizer import Lion

    kwargs = _options(Lion, "lion", key, extra, lr=lr, **_betas(betas))
    return Lion(groups, **kwargs)


def _sophia(groups, lr, betas, eps, key, extra) -> torch.optim.Optimizer:
    from pytorch_optimizer import SophiaH

    kwargs = _options(SophiaH, "sophia", key, extra, lr=lr, **_betas(betas))
    return SophiaH(groups, **kwargs)


def _muon(groups, lr, betas, eps, key, extra) -> torch.optim.Optimizer:
    from pytorch_optimizer import Muon

    # Moonlight's shape-aware scaling (0.2·sqrt(max(rows, cols))) gives the orthogonal
    # update AdamW's RMS, so the one configured lr and weight decay serve both halves.
    # The adamw_* constructor defaults are overridden per group below, so refuse them.
    set_per_group = ("adamw_lr", "adamw_betas", "adamw_wd", "adamw_eps")
    kwargs = _options(Muon, "muon", key, extra, use_adjusted_lr=True, _unused=set_per_group)
    for group in groups:
        group["lr"] = lr
        if not group["use_muon"]:
            group["eps"] = eps
            if betas is not None:
                group["betas"] = tuple(betas)
    return Muon(groups, **kwargs)


def _adamw8bit(groups, lr, betas, eps, key, extra) -> torch.optim.Optimizer:
    # AdamW with its two moments stored blockwise in 8 bits (bitsandbytes): 2 bytes of state
    # per parameter instead of 8. bitsandbytes' kernels are CUDA ones, so CPU is refused here.
    try:
        from bitsandbytes.optim import AdamW8bit
    except ImportError:
        raise LmforgeError(f"{key}: 'adamw8bit' needs the bitsandbytes package, which is not installed "
                           f"(pip install bitsandbytes, on a CUDA machine), or use 'adamw'") from None
    device = groups[0]["params"][0].device
    if device.type != "cuda":
        raise LmforgeError(f"{key}: 'adamw8bit' (bitsandbytes) runs on CUDA only, but the model is on "
                           f"{device}; use 'adamw'")
    return AdamW8bit(groups, **_options(AdamW8bit, "adamw8bit", key, extra, lr=lr, eps=eps, **_betas(betas)))


_BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adafactor": _adafactor,
    "lion": _lion,
    "sophia": _sophia,
    "muon": _muon,
    "adamw8bit": _adamw8bit,
}


def _betas(betas: tuple[float, float] | None) -> dict[str, tuple[float, float]]:
    return {} if betas is None else {"betas": tuple(betas)}


def _options(
    cls: type, name: str, key: str, extra: dict[str, Any], _unused: tuple[str, ...] = (), **ours: Any
) -> dict[str, Any]:
    """Merge ``extra`` over our defaults, refusing names the constructor would not use.

    pytorch_optimizer constructors swallow unknown keywords (``**kwargs``), so a
    typo would be silently ignored; check against the explicit signature instead.
    """
    accepted = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in ("self", *_RESERVED, *_unused)
    ]
    for option in extra:
        if option not in accepted:
            raise LmforgeError(
                f"{key}: option {option!r} is not accepted by {name} (accepted: {', '.join(sorted(accepted))})"
            )
    return {**ours, **extra}


# --------------------------------------------------------------------------- sophia's backward


def needs_hessian(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer`` reads second derivatives through the gradients' graph (sophia).

    Such an optimizer needs, on the steps where ``hessian_due`` is true,
    ``loss.backward(create_graph=True)`` for every micro-batch of the step, and
    ``optimizer.zero_grad(set_to_none=True)`` after the step (the default), which
    frees the graph the gradients hold. Its ``step()`` takes no arguments.
    """
    library = sys.modules.get("pytorch_optimizer")  # not imported yet: no SophiaH exists
    return library is not None and isinstance(optimizer, library.SophiaH)


def hessian_due(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the next ``optimizer.step()`` estimates the Hessian (so backward needs a graph).

    SophiaH refreshes its Hutchinson estimate on step 1 and every ``update_period``
    steps after; keeping the graph only on those steps saves its memory and time on
    the others. The step count lives in the param groups, so this stays right after
    ``load_state_dict``. Always False for optimizers that do not need a Hessian.

    Usage in the loop: ``backward(loss, optimizer)``, or equivalently
    ``loss.backward(create_graph=hessian_due(optimizer))``.
    """
    if not needs_hessian(optimizer):
        return False
    steps_done = optimizer.param_groups[0].get("step", 0)
    return steps_done % optimizer.update_period == 0


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """One update. Every optimizer here steps without arguments (SophiaH computes its
    Hessian estimate inside ``step()`` from the graph ``backward`` kept), so this is
    ``optimizer.step()``; it exists so the loop has one place to change if that stops
    being true."""
    optimizer.step()


def forward_context(optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager:
    """Context for the forward pass: the math attention kernel when ``hessian_due``.

    The flash / memory-efficient ``scaled_dot_product_attention`` kernels (CPU and
    CUDA) have no double backward, so a Hessian step must build its graph through
    the math kernel. Other steps keep the fast kernels.
    """
    return sdpa_kernel(SDPBackend.MATH) if hessian_due(optimizer) else contextlib.nullcontext()


def backward(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """``loss.backward()``, keeping the graph of the gradients when ``hessian_due``.

    torch warns that ``create_graph=True`` ties each parameter to its gradient in a
    reference cycle; the loop's ``optimizer.zero_grad(set_to_none=True)`` after the
    step breaks it, so that one warning is silenced here.
    """
    create_graph = hessian_due(optimizer)
    with warnings.catch_warnings():
        if create_graph:
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        loss.backward(create_graph=create_graph)


# --------------------------------------------------------------------------- schedules


def lr_factor(
    step: int,
    *,
    name: str,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float = 0.0,
    power: float = 1.0,
    key: str = "train.scheduler",
) -> float:
    """Multiplier of the base learning rate for the update with 0-based index ``step``.

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, so the first
    update already moves (lr/warmup) and update ``warmup_steps - 1`` uses the full lr.
    Then, with ``t = (step - warmup_steps) / (max_steps - warmup_steps)`` clamped to
    [0, 1] and ``m = min_lr_ratio``:

    - none:       1
    - linear:     m + (1 - m) · (1 - t)
    - polynomial: m + (1 - m) · (1 - t) ** power
    - cosine:     m + (1 - m) · (1 + cos(π t)) / 2

    so the factor is 1 at ``warmup_steps`` and ``m`` from ``max_steps`` on.
    """
    _check_schedule(name, warmup_steps, max_steps, min_lr_ratio, power, key)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "none":
        return 1.0
    t = min(max((step - warmup_steps) / (max_steps - warmup_steps), 0.0), 1.0)
    if name == "linear":
        shape = 1.0 - t
    elif name == "polynomial":
        shape = (1.0 - t) ** power
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * t))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float = 0.0,
    power: float = 1.0,
    key: str = "train.scheduler",
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying ``lr_factor`` to every param group's base lr.

    Call ``scheduler.step()`` once after each ``optimizer.step()``. On resume,
    build it before ``optimizer.load_state_dict`` / ``scheduler.load_state_dict``.
    """
    _check_schedule(name, warmup_steps, max_steps, min_lr_ratio, power, key)
    factor = functools.partial(
        lr_factor,
        name=name,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        min_lr_ratio=min_lr_ratio,
        power=power,
        key=key,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _check_schedule(name: str, warmup_steps: int, max_steps: int, min_lr_ratio: float, power: float, key: str):
    if name not in SCHEDULERS:
        raise LmforgeError(f"{key}: unknown scheduler {name!r} (choose from {', '.join(SCHEDULERS)})")
    if warmup_steps < 0:
        raise LmforgeError(f"{key}: warmup_steps must be >= 0, got {warmup_steps}")
    if name != "none" and max_steps <= warmup_steps:
        raise LmforgeError(
            f"{key}: max_steps ({max_steps}) must exceed warmup_steps ({warmup_steps}) for a {name} decay"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise LmforgeError(f"{key}: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if not power > 0:
        raise LmforgeError(f"{key}: power must be > 0, got {power}")
