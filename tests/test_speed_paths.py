"""The fast paths give the numbers of the plain ones: fused linear cross-entropy, maskless batched decoding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import kernels
from lmforge.generate import generate
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.stages.common import training_options
from lmforge.kernels import linear_cross_entropy
from lmforge.train.lm import lm_loss, next_token_loss

N, D, V = 45, 16, 37


@pytest.fixture
def head():
    """Hidden states h (N, D), an output layer (V, D) and targets with two ignored positions."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    y[[3, 17]] = -100
    return h, w, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [7, 16, 1000])  # chunks that do not divide N, and a single chunk
def test_linear_cross_entropy_equals_cross_entropy_of_logits(head, reduction, chunk_rows):
    h, w, y = head
    expected = F.cross_entropy(h @ w.T, y, reduction=reduction)
    expected_grads = torch.autograd.grad(expected * 0.5, (h, w))
    got = linear_cross_entropy(h, w, y, reduction=reduction, chunk_rows=chunk_rows)
    got_grads = torch.autograd.grad(got * 0.5, (h, w))  # the incoming gradient scales the stored ones
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_keeps_the_loss_of_hopeless_targets(head):
    """A target ~200 nats below the best logit has p = 0 in fp32; its loss still equals F.cross_entropy's."""
    h, w, y = head
    h = (h.detach() * 40).requires_grad_()  # logit gaps of hundreds of nats
    logits = h @ w.T
    y = torch.where(y >= 0, logits.argmin(1), y)  # every counted target is its row's least likely token
    assert (logits.max(1).values - logits.min(1).values)[y >= 0].min() > 120
    expected = F.cross_entropy(logits, y, reduction="sum")
    got = linear_cross_entropy(h, w, y, reduction="sum", chunk_rows=16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(torch.autograd.grad(got, h)[0], torch.autograd.grad(expected, h)[0])


def test_linear_cross_entropy_second_derivative_matches(head):
    """A Hessian-vector product (what Sophia's create_graph backward needs) goes through the fused loss too."""
    h, w, y = head
    g = torch.Generator().manual_seed(1)
    vec = (torch.randn(N, D, generator=g), torch.randn(V, D, generator=g))

    def hvp(loss):
        grads = torch.autograd.grad(loss, (h, w), create_graph=True)
        return torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, vec)), (h, w))

    for a, b in zip(hvp(linear_cross_entropy(h, w, y, chunk_rows=8)), hvp(F.cross_entropy(h @ w.T, y))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_frozen_weight_and_no_grad(head):
    h, w, y = head
    loss = linear_cross_entropy(h, w.detach(), y, chunk_rows=8)
    (grad_h,) = torch.autograd.grad(loss, (h,))
    torch.testing.assert_close(grad_h, torch.autograd.grad(F.cross_entropy(h @ w.T, y), (h,))[0])
    with torch.no_grad():
        value = linear_cross_entropy(h, w, y, reduction="sum")
    assert not value.requires_grad
    torch.testing.assert_close(value, F.cross_entropy(h @ w.T, y, reduction="sum"), rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_under_autocast_runs_the_matmuls_in_bf16(head):
    """The CUDA training path (bf16 autocast), exercised on CPU: fp32 loss, fp32 parameter gradients."""
    h, w, y = head
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, chunk_rows=8)
    loss.backward()
    ref = F.cross_entropy(h.detach().bfloat16().float() @ w.detach().bfloat16().float().T, y)
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-2


def tiny_model(**overrides) -> Transformer:
    cfg = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    cfg.update(overrides)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**cfg))


def test_lm_loss_fused_path_equals_logits_path():
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 61, (3, 32), generator=g), torch.randint(0, 61, (3, 32), generator=g)
    loss, metrics = lm_loss(model, (x, y))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = F.cross_entropy(model(x).view(-1, 61), y.reshape(-1))
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert metrics == {"tokens": 96}
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


needs_onednn = pytest.mark.skipif(not kernels._ONEDNN, reason="this torch has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_training_projection_through_onednn_gives_f_linear_values_and_gradients(bias):
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(24, 40, bias=bias)
    x = torch.randn(2, 5, 24, generator=g, requires_grad=True)
    up = torch.randn(2, 5, 40, generator=g)
    with torch.profiler.profile() as prof:
        y = kernels.project(layer, x)
    assert any(e.name == "lmforge::onednn_linear" for e in prof.events())  # the oneDNN path ran
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad((y * up).sum(), params)
    ref = F.linear(x, layer.weight, layer.bias)
    ref_grads = torch.autograd.grad((ref * up).sum(), params)
    torch.testing.assert_close(y, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    # The autograd registration as torch.compile and double backward see it.
    torch.library.opcheck(torch.ops.lmforge.onednn_linear.default,
                          (x.detach().requires_grad_(), layer.weight, layer.bias))


@needs_onednn
def test_training_projection_has_a_second_derivative():
    """Sophia's Hessian steps differentiate the gradient (create_graph) through the projections."""
    g = torch.Generator().manual_seed(4)
    layer = nn.Linear(8, 6)
    x = torch.randn(3, 8, generator=g, requires_grad=True)
    v = torch.randn(6, 8, generator=g)

    def hvp(y):
        (gw,) = torch.autograd.grad(y.pow(3).sum(), layer.weight, create_graph=True)
        return torch.autograd.grad((gw * v).sum(), (x, layer.weight))

    for a, b in zip(hvp(kernels.project(layer, x)), hvp(F.linear(x, layer.weight, layer.bias))):
        torch.testing.assert_close(a, b)


def test_model_gradients_are_the_same_with_and_without_the_onednn_projections(monkeypatch):
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(0, 61, (3, 32), generator=g), torch.randint(0, 61, (3, 32), generator=g)
    loss = lm_loss(model, (x, y))[0]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    monkeypatch.setattr(kernels, "_ONEDNN", False)  # every projection through nn.Linear (MKL on CPU)
    ref = lm_loss(model, (x, y))[0]
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_next_token_loss_falls_back_to_logits_for_a_wrapped_head():
    """An adapter in place of lm_head (anything but a bias-free nn.Linear) must be run, not bypassed."""
    model = tiny_model()

    class Doubled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h):
            return 2 * self.inner(h)

    model.lm_head = Doubled(model.lm_head)
    x = torch.randint(0, 61, (2, 8))
    y = torch.randint(0, 61, (2, 8))
    expected = F.cross_entropy(2 * (model.hidden_states(x) @ model.embed_tokens.weight.T).view(-1, 61), y.view(-1))
    torch.testing.assert_close(next_token_loss(model, x, y), expected)


@torch.no_grad()
def ref_greedy(model, prompt, n, stop_ids=()):
    """No cache, no batch: the whole sequence through the model for each new token."""
    model.eval()
    seq, out = list(prompt), []
    for _ in range(n):
        tok = int(model(torch.tensor([seq]))[0, -1].argmax())
        seq.append(tok)
        out.append(tok)
        if tok in stop_ids:
            break
    return out


def sharp_model():
    """Logits far from ties, and (untied) not just a copy of the last token."""
    model = tiny_model(tie_embeddings=False).eval()
    with torch.no_grad():
        model.embed_tokens.weight.mul_(40.0)
        for layer in model.layers:
            layer.self_attn.o_proj.weight.mul_(5.0)
            layer.mlp.down_proj.weight.mul_(5.0)
    return model


def test_equal_length_batch_decodes_like_each_prompt_alone():
    model = sharp_model()
    prompts = [[5, 9, 2, 7], [7, 1, 4, 4], [12, 30, 6, 6]]
    out = generate(model, prompts, max_new_tokens=12, temperature=0)
    assert out.tokens == [ref_greedy(model, p, 12) for p in prompts]
    assert out.finished == [False] * 3


def test_equal_length_batch_with_a_stop_token_leaves_the_other_rows_alone():
    model = sharp_model()
    prompts = [[5, 9, 2, 7], [7, 1, 4, 4], [12, 30, 6, 6]]
    free = [ref_greedy(model, p, 12) for p in prompts]
    stop = free[1][2]  # row 1 stops after 3 tokens; the others whenever they emit it
    out = generate(model, prompts, max_new_tokens=12, temperature=0, stop_ids=[stop])
    expected = [ref_greedy(model, p, 12, stop_ids=[stop]) for p in prompts]
    assert out.tokens == expected and out.tokens[1] == free[1][:3]
    assert len({len(t) for t in expected}) == 3  # the rows really stop at different steps
    assert out.finished == [stop in t for t in expected]


@pytest.mark.parametrize("wrapped", ["q_proj", "up_proj", None])
def test_decoding_with_fused_projections_equals_the_module_path(wrapped, monkeypatch):
    """Decoding concatenates q/k/v and gate/up weights, unless a layer is not a plain nn.Linear (an adapter)."""

    class Shifted(nn.Module):  # an adapter-like replacement: its own forward must run
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 0.5

    model = sharp_model()
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.bias = nn.Parameter(torch.randn(32))  # a bias is concatenated too
    if wrapped:
        parent = model.layers[1].self_attn if wrapped == "q_proj" else model.layers[1].mlp
        setattr(parent, wrapped, Shifted(getattr(parent, wrapped)))
    fused = set()
    original = KVCache.fused
    monkeypatch.setattr(KVCache, "fused", lambda cache, *ls: fused.add(id(ls[0])) or original(cache, *ls))
    prompts = [[5, 9, 2, 7], [7, 1, 4, 4]]
    out = generate(model, prompts, max_new_tokens=10, temperature=0)
    assert out.tokens == [ref_greedy(model, p, 10) for p in prompts]
    assert len(fused) == (3 if wrapped else 4)  # 2 layers x (q/k/v, gate/up), less the wrapped one
    single = generate(model, prompts[:1], max_new_tokens=10, temperature=0)  # one row: the matrix-vector path
    assert single.tokens == out.tokens[:1]


@pytest.mark.integration  # torch.compile: inductor builds C++ with the system compiler
def test_compiled_trunk_gives_the_eager_loss_and_gradients_and_leaves_decoding_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    eager = tiny_model()
    compiled = training_options(tiny_model(), {"compile": True}, "pretrain")  # the config key's path
    assert compiled.torch_compile and not eager.torch_compile
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 61, (2, 16), generator=g), torch.randint(0, 61, (2, 16), generator=g)
    losses = []
    for model in (eager, compiled):
        loss, _ = lm_loss(model, (x, y))
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    prompts = [[1, 2, 3], [4, 5, 6]]
    assert (generate(compiled, prompts, max_new_tokens=5, temperature=0).tokens
            == generate(eager, prompts, max_new_tokens=5, temperature=0).tokens)
