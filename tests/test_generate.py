"""Generation with the KV cache against a no-cache reference that re-runs the full forward every step."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.generate import generate, sample_next_token, stream
from lmforge.model import ModelConfig, Transformer

V = 53
PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 11], [12, 30, 6, 6, 2]]


def make_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny model with sharpened logits, so greedy choices are far from ties."""
    cfg = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**cfg))
    with torch.no_grad():
        model.embed_tokens.weight.mul_(40.0)
        for layer in model.layers:
            layer.self_attn.o_proj.weight.mul_(5.0)
            layer.mlp.down_proj.weight.mul_(5.0)
            if layer.self_attn.q_proj.bias is not None:  # zero-initialised: make it matter
                layer.self_attn.q_proj.bias.normal_()
    return model


def ref_filter(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus on one row of probabilities, by walking the sorted list."""
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    keep = order[:top_k] if top_k else order
    kept_mass = sum(float(probs[i]) for i in keep)
    nucleus, total = [], 0.0
    for i in keep:
        nucleus.append(i)
        total += float(probs[i]) / kept_mass
        if total >= top_p:
            break
    out = torch.zeros_like(probs)
    out[nucleus] = probs[nucleus]
    return out / out.sum()


@torch.no_grad()
def ref_generate(model, prompt, n, *, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(), generator=None):
    """One prompt, no cache, no padding: the full sequence through the model for every new token."""
    model.eval()
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1]
        if temperature == 0:
            tok = int(logits.argmax())
        else:
            probs = ref_filter(torch.softmax(logits / temperature, -1), top_k, top_p)
            tok = int(torch.multinomial(probs[None], 1, generator=generator))
        seq.append(tok)
        out.append(tok)
        if tok in stop_ids:
            break
    return out


ARCHS = {"rope-gqa": {}, "alibi-window": dict(positional_encoding="alibi", sliding_window=6),
         "learned-mqa": dict(positional_encoding="learned", attention_type="mqa", n_kv_heads=None),
         "sinusoidal-window": dict(positional_encoding="sinusoidal", sliding_window=4)}


@pytest.mark.parametrize("arch", list(ARCHS.values()), ids=list(ARCHS))
def test_batched_cached_greedy_equals_full_forward_reference(arch):
    model = make_model(**arch)
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    assert out.tokens == [ref_generate(model, p, 10, temperature=0) for p in PROMPTS]
    assert out.finished == [False] * 3


def test_cached_sampling_equals_full_forward_reference():
    model = make_model()
    kw = dict(temperature=0.8, top_k=12, top_p=0.9)
    g = torch.Generator().manual_seed(3)
    ref = [ref_generate(model, p, 9, generator=g, **kw) for p in PROMPTS]
    out = generate(model, PROMPTS, max_new_tokens=9, batch_size=1, generator=torch.Generator().manual_seed(3), **kw)
    assert out.tokens == ref


@torch.no_grad()
def test_logprobs_equal_full_forward_recomputation():
    model = make_model()
    for temperature in (0.7, 0.0):
        out = generate(model, PROMPTS, max_new_tokens=6, temperature=temperature,
                       generator=torch.Generator().manual_seed(0))
        t = temperature or 1.0
        for prompt, toks, lps in zip(PROMPTS, out.tokens, out.logprobs):
            logits = model(torch.tensor([prompt + toks]))[0, len(prompt) - 1:-1]
            expected = F.log_softmax(logits / t, -1).gather(-1, torch.tensor(toks)[:, None])[:, 0]
            torch.testing.assert_close(lps, expected, atol=1e-4, rtol=1e-4)


def test_greedy_top_k_1_and_tiny_top_p_agree():
    model = make_model()
    greedy = generate(model, PROMPTS, max_new_tokens=8, temperature=0).tokens
    g = torch.Generator().manual_seed(1)
    assert generate(model, PROMPTS, max_new_tokens=8, temperature=1.5, top_k=1, generator=g).tokens == greedy
    assert generate(model, PROMPTS, max_new_tokens=8, temperature=1.5, top_p=1e-6, generator=g).tokens == greedy


def test_sample_next_token_greedy_is_argmax():
    logits = torch.randn(4, V)
    tokens, logprobs = sample_next_token(logits, temperature=0)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(logprobs, F.log_softmax(logits, -1).max(-1).values)


def test_seeds_control_sampling():
    model = make_model()

    def run(seed):
        return generate(model, PROMPTS, max_new_tokens=12, temperature=3.0,
                        generator=torch.Generator().manual_seed(seed)).tokens

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_token_ends_its_row_only():
    model = make_model()
    greedy = generate(model, PROMPTS, max_new_tokens=8, temperature=0).tokens
    stop = greedy[1][2]  # row 1's third token
    out = generate(model, PROMPTS, max_new_tokens=8, temperature=0, stop_ids=[stop])
    for row, full in zip(out.tokens, greedy):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]
    assert out.finished == [stop in g for g in greedy]
    assert out.finished[1] and out.tokens[1][-1] == stop
    assert [len(lp) for lp in out.logprobs] == [len(t) for t in out.tokens]


def test_batch_size_and_stream_give_the_same_tokens():
    model = make_model()
    whole = generate(model, PROMPTS, max_new_tokens=7, temperature=0)
    assert generate(model, PROMPTS, max_new_tokens=7, temperature=0, batch_size=2).tokens == whole.tokens
    assert list(stream(model, PROMPTS[1], max_new_tokens=7, temperature=0)) == whole.tokens[1]
    stop = whole.tokens[1][3]
    assert list(stream(model, PROMPTS[1], max_new_tokens=7, temperature=0, stop_ids=[stop])) == \
        whole.tokens[1][:whole.tokens[1].index(stop) + 1]


def test_context_limits_and_mode_restore():
    model = make_model(max_seq_len=16)
    model.train()
    out = generate(model, [[1] * 14, [2, 3]], max_new_tokens=5, temperature=0)
    assert [len(t) for t in out.tokens] == [2, 5]  # the long prompt has only 2 positions left
    assert model.training
    assert generate(model, [[1] * 16], max_new_tokens=5).tokens == [[]]
    model.eval()
    generate(model, [[1, 2]], max_new_tokens=2)
    assert not model.training
    with pytest.raises(LmforgeError, match=r"prompt 1 has 17 tokens, more than model.max_seq_len \(16\)"):
        generate(model, [[1], [1] * 17], max_new_tokens=1)
    with pytest.raises(LmforgeError, match="prompt 0 is empty"):
        generate(model, [[]], max_new_tokens=1)
    with pytest.raises(LmforgeError, match=r"top_p \(0\) must be in \(0, 1\]"):
        generate(model, [[1]], max_new_tokens=1, top_p=0)
