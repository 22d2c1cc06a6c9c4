"""Optimizers and LR schedules: formulas, training progress, checkpoint round trips, errors."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.train.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    backward,
    build_optimizer,
    build_scheduler,
    forward_context,
    hessian_due,
    lr_factor,
    needs_hessian,
    optimizer_step,
    param_groups,
)

CPU_OPTIMIZERS = [o for o in OPTIMIZERS if o != "adamw8bit"]  # bitsandbytes' 8-bit AdamW needs CUDA

VOCAB, D = 16, 8

# A learning rate per optimizer that makes visible progress in 30 steps on the toy task
# (their lr scales differ: adafactor's is relative, sophia's step is capped at lr·p).
LR = {"adamw": 1e-2, "adafactor": 1e-1, "lion": 3e-3, "sophia": 1.0, "muon": 2e-2}


class Toy(nn.Module):
    """Embedding → residual MLP → LayerNorm → lm_head: every kind of parameter the LM has."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.fc1 = nn.Linear(D, 4 * D)
        self.fc2 = nn.Linear(4 * D, D)
        self.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,) → (B, VOCAB)
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.lm_head(self.norm(h))


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Learn a fixed permutation of the vocabulary."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (64,), generator=g)
    return x, torch.randperm(VOCAB, generator=g)[x]


def train(model, optimizer, steps, scheduler=None) -> list[float]:
    """The loop as the trainer runs it, Sophia's requirements included; returns losses."""
    x, y = toy_data()
    losses = []
    for _ in range(steps):
        with forward_context(optimizer):
            loss = F.cross_entropy(model(x), y)
        backward(loss, optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def fresh(name: str, **extra):
    torch.manual_seed(0)
    model = Toy()
    return model, build_optimizer(model, name=name, lr=LR[name], weight_decay=0.1, **extra)


# --------------------------------------------------------------------------- lr_factor


def test_warmup_is_linear_and_reaches_one():
    kw = dict(warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    for name in SCHEDULERS:
        assert [lr_factor(s, name=name, **kw) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
        assert lr_factor(4, name=name, **kw) == pytest.approx(1.0)


def test_cosine_midpoint_and_end():
    kw = dict(name="cosine", warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert lr_factor(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # t = 1/2: cos(π/2) = 0
    assert lr_factor(6, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_factor(14, **kw) == pytest.approx(0.1)
    assert lr_factor(1000, **kw) == pytest.approx(0.1)


def test_linear_and_polynomial_by_hand():
    kw = dict(warmup_steps=0, max_steps=10, min_lr_ratio=0.2)
    # t = 0.3: linear 0.2 + 0.8·0.7; power 2: 0.2 + 0.8·0.49
    assert lr_factor(3, name="linear", **kw) == pytest.approx(0.76)
    assert lr_factor(3, name="polynomial", power=2.0, **kw) == pytest.approx(0.592)
    assert lr_factor(3, name="polynomial", power=1.0, **kw) == pytest.approx(0.76)
    assert lr_factor(0, name="linear", **kw) == pytest.approx(1.0)
    assert lr_factor(10, name="linear", **kw) == pytest.approx(0.2)
    assert lr_factor(10, name="polynomial", power=2.0, **kw) == pytest.approx(0.2)


def test_none_is_constant_after_warmup():
    assert [lr_factor(s, name="none", warmup_steps=2, max_steps=5) for s in range(8)] == pytest.approx(
        [0.5, 1, 1, 1, 1, 1, 1, 1]
    )


def test_scheduler_scales_every_group_and_resumes():
    model, opt = fresh("muon")
    base = [g["lr"] for g in opt.param_groups]
    sched = build_scheduler(opt, name="cosine", warmup_steps=2, max_steps=10, min_lr_ratio=0.1)
    train(model, opt, 5, sched)
    expected = lr_factor(5, name="cosine", warmup_steps=2, max_steps=10, min_lr_ratio=0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * expected for b in base])

    # Resume in the documented order: build optimizer, build scheduler, then load both.
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    _, opt2 = fresh("muon")
    sched2 = build_scheduler(opt2, name="cosine", warmup_steps=2, max_steps=10, min_lr_ratio=0.1)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([b * expected for b in base])
    sched.step(), sched2.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())


# --------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(name):
    model, opt = fresh(name)
    assert isinstance(opt, torch.optim.Optimizer)
    losses = train(model, opt, 30)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
def test_state_dict_round_trip_continues_identically(name):
    extra = {"update_period": 2} if name == "sophia" else {}  # make Sophia refresh its Hessian after resume
    model_a, opt_a = fresh(name, **extra)
    train(model_a, opt_a, 5)

    # Through bytes, with torch.load's safe default, as a checkpoint file would go.
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optim": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model_b, opt_b = fresh(name, **extra)
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["optim"])

    torch.manual_seed(123)  # Sophia's Hutchinson probes draw from the global RNG
    train(model_a, opt_a, 5)
    torch.manual_seed(123)
    train(model_b, opt_b, 5)
    for (n, a), b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b), n


def test_weight_decay_groups_follow_the_nanogpt_rule():
    model = Toy()
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    decay = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert decay == {id(p) for p in (model.embed.weight, model.fc1.weight, model.fc2.weight, model.lm_head.weight)}
    assert no_decay == {id(p) for p in (model.fc1.bias, model.fc2.bias, model.norm.weight, model.norm.bias)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0


def test_groups_skip_frozen_and_count_tied_weights_once():
    model = Toy()
    model.lm_head = nn.Linear(D, VOCAB, bias=False)
    model.lm_head.weight = model.embed.weight  # tied
    model.norm.requires_grad_(False)
    params = [p for g in param_groups(model, 0.1) for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == 5  # embed/lm_head, fc1 ×2, fc2 ×2


def test_decoupled_weight_decay_reaches_the_decay_group_only():
    # With zero gradients AdamW's update is pure decay: p ← p·(1 − lr·wd) for the decay group.
    model = Toy()
    opt = build_optimizer(model, name="adamw", lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if p.ndim >= 2 else 1.0
        torch.testing.assert_close(p, before[n] * factor, msg=n)


def test_muon_takes_hidden_matrices_only():
    model = Toy()
    opt = build_optimizer(model, name="muon", lr=1e-3, weight_decay=0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["muon"] == {id(model.fc1.weight), id(model.fc2.weight)}
    assert ids["adamw_decay"] == {id(model.embed.weight), id(model.lm_head.weight)}
    one_d = (model.fc1.bias, model.fc2.bias, model.norm.weight, model.norm.bias)
    assert ids["adamw_no_decay"] == {id(p) for p in one_d}
    assert groups["muon"]["use_muon"] and not groups["adamw_decay"]["use_muon"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)


def test_muon_recognises_heads_and_embeddings_by_name():
    model = nn.ModuleDict({"pos_embedding": nn.Linear(4, 4), "value_head": nn.Linear(4, 1), "proj": nn.Linear(4, 4)})
    groups = {g["name"]: g for g in build_optimizer(model, name="muon", lr=1e-3).param_groups}
    assert {id(p) for p in groups["muon"]["params"]} == {id(model["proj"].weight)}
    assert {id(p) for p in groups["adamw_decay"]["params"]} == {
        id(model["pos_embedding"].weight),
        id(model["value_head"].weight),
    }


def test_muon_update_of_a_hidden_matrix_is_orthogonalised():
    # One step from zero momentum: ΔW ∝ NS(grad), whose singular values are all ≈ 1 (Newton–Schulz
    # in Muon lands in roughly [0.7, 1.2]); an Adam step would keep the gradient's spread.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    opt = build_optimizer(model, name="muon", lr=1.0)
    w = model[0].weight
    before = w.detach().clone()
    w.grad = torch.randn(8, 8) @ torch.diag(torch.logspace(0, 2, 8))  # badly conditioned
    opt.step()
    scale = 0.2 * math.sqrt(8)  # Moonlight lr adjustment
    singular = torch.linalg.svdvals((before - w.detach()) / scale)
    assert singular.min() > 0.5 and singular.max() < 1.3, singular


def test_adamw_matches_torch_reference():
    torch.manual_seed(0)
    model, ref_model = Toy(), Toy()
    ref_model.load_state_dict(model.state_dict())
    opt = build_optimizer(model, name="adamw", lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    ref = torch.optim.AdamW(param_groups(ref_model, 0.1), lr=1e-2, betas=(0.8, 0.9), eps=1e-6)
    x, y = toy_data()
    for _ in range(3):
        for m, o in ((model, opt), (ref_model, ref)):
            F.cross_entropy(m(x), y).backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_extra_options_reach_the_implementation():
    _, opt = fresh("sophia", update_period=3, p=0.5)
    assert opt.update_period == 3 and opt.param_groups[0]["p"] == 0.5
    _, opt = fresh("muon", momentum=0.8)
    assert {g["name"]: g.get("momentum") for g in opt.param_groups}["muon"] == 0.8


# --------------------------------------------------------------------------- sophia's hessian


def test_hessian_due_follows_sophias_update_period():
    model, opt = fresh("sophia", update_period=3)
    assert needs_hessian(opt)
    due = []
    for _ in range(7):
        due.append(hessian_due(opt))
        train(model, opt, 1)
    assert due == [True, False, False, True, False, False, True]
    for name in ("adamw", "muon"):
        assert not needs_hessian(fresh(name)[1]) and not hessian_due(fresh(name)[1])


def test_sophia_step_without_graph_fails_where_due():
    # Documents why the loop must use backward(): a plain backward cannot feed the estimator.
    model, opt = fresh("sophia")
    x, y = toy_data()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError):
        opt.step()


def test_forward_context_makes_attention_twice_differentiable():
    model, opt = fresh("sophia")
    w = model.fc1.weight
    q = torch.randn(1, 2, 4, 8)
    with forward_context(opt):
        out = F.scaled_dot_product_attention(q @ w[:8].T, q, q, is_causal=True)
    backward(out.square().sum(), opt)
    hz = torch.autograd.grad(w.grad, w, grad_outputs=torch.ones_like(w))[0]
    assert hz.shape == w.shape


# --------------------------------------------------------------------------- errors


def test_unknown_optimizer_names_key_and_choices():
    with pytest.raises(LmforgeError) as err:
        build_optimizer(Toy(), name="adamx", lr=1e-3)
    assert str(err.value) == (
        "train.optimizer: unknown optimizer 'adamx' (choose from adamw, adafactor, lion, sophia, muon, adamw8bit)"
    )


def test_unknown_scheduler_names_key_and_choices():
    opt = build_optimizer(Toy(), name="adamw", lr=1e-3)
    with pytest.raises(LmforgeError) as err:
        build_scheduler(opt, name="cosin", warmup_steps=0, max_steps=10, key="sft.scheduler")
    assert str(err.value) == "sft.scheduler: unknown scheduler 'cosin' (choose from none, cosine, linear, polynomial)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="adamw", lr=0.0), "train.optimizer: lr must be > 0, got 0.0"),
        (dict(name="adamw", lr=1e-3, weight_decay=-1.0), "train.optimizer: weight_decay must be >= 0, got -1.0"),
        (dict(name="lion", lr=1e-3, momentum=0.9), "train.optimizer: option 'momentum' is not accepted by lion"),
        (dict(name="muon", lr=1e-3, adamw_lr=1.0), "train.optimizer: option 'adamw_lr' is not accepted by muon"),
    ],
)
def test_bad_optimizer_arguments(kwargs, message):
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_optimizer(Toy(), **kwargs)


def test_params_restricts_training_to_a_subset():
    model = Toy()
    head = list(model.lm_head.parameters()) + list(model.norm.parameters())
    for name in ("adamw", "muon"):
        opt = build_optimizer(model, name=name, lr=1e-3, params=head)
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in head}
        assert {g["name"] for g in opt.param_groups} == (
            {"adamw_decay", "adamw_no_decay"} if name == "muon" else {"decay", "no_decay"}
        )


def test_model_without_trainable_parameters():
    model = Toy().requires_grad_(False)
    with pytest.raises(LmforgeError, match="train.optimizer: the model has no trainable parameters"):
        build_optimizer(model, name="adamw", lr=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="cosine", warmup_steps=10, max_steps=10), r"max_steps \(10\) must exceed warmup_steps \(10\)"),
        (dict(name="linear", warmup_steps=-1, max_steps=10), "warmup_steps must be >= 0"),
        (dict(name="cosine", warmup_steps=0, max_steps=10, min_lr_ratio=1.5), r"min_lr_ratio must be in \[0, 1\]"),
        (dict(name="polynomial", warmup_steps=0, max_steps=10, power=0.0), "power must be > 0"),
    ],
)
def test_bad_schedule_arguments(kwargs, message):
    with pytest.raises(LmforgeError, match="train.scheduler: " + message):
        lr_factor(0, **kwargs)


@pytest.mark.integration  # a fresh interpreter
def test_stages_start_without_importing_pytorch_optimizer():
    # It pulls in transformers and torch.distributed.tensor (~1.3 s per rule); only Lion, Sophia and Muon need it.
    import subprocess
    import sys

    code = ("import sys, torch, lmforge.stages.sft, lmforge.stages.dpo\n"
            "from lmforge.train.optim import build_optimizer, needs_hessian\n"
            "opt = build_optimizer(torch.nn.Linear(2, 2), name='adamw', lr=1e-3)\n"
            "assert not needs_hessian(opt)\n"
            "print('pytorch_optimizer' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
