"""The transformer against straightforward references: explicit-loop attention, paper formulas, Hugging Face."""

import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import (
    ModelConfig, RewardModel, Transformer, ValueModel, alibi_slopes, apply_rope, attention_mask,
    packed_position_ids, padded_position_ids, rope_frequencies, rope_tables, sinusoidal_table,
    yarn_attention_scale, yarn_frequencies,
)

# ----------------------------------------------------------------------------- fixtures


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24)
    base.update(overrides)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model in eval mode with norm weights and biases moved off their 1/0 init, so they matter."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(5.0)  # bigger residual branches make every layer's contribution visible
    return model


OPTIONS = {
    "rope-gqa-swiglu-rmsnorm": {},
    "mha-layernorm-gelu": dict(attention_type="mha", n_kv_heads=None, norm_type="layernorm", activation="gelu"),
    "mqa-relu-untied": dict(attention_type="mqa", n_kv_heads=None, activation="relu", tie_embeddings=False),
    "alibi-6-heads-silu": dict(positional_encoding="alibi", d_model=48, n_heads=6, n_kv_heads=3, activation="silu"),
    "sinusoidal-leaky-relu": dict(positional_encoding="sinusoidal", activation="leaky_relu"),
    "learned-attention-bias": dict(positional_encoding="learned", attention_bias=True),
    "yarn": dict(positional_encoding="yarn", original_max_seq_len=12, rope_scaling_factor=2.0, rope_theta=500.0),
    "rope-theta-window": dict(rope_theta=100.0, sliding_window=4),
    "alibi-window-mha": dict(positional_encoding="alibi", sliding_window=5, attention_type="mha", n_kv_heads=None),
}
option = pytest.mark.parametrize("overrides", list(OPTIONS.values()), ids=list(OPTIONS))


# ----------------------------------------------------------------------------- the reference model


def ref_norm(norm, x, cfg):
    if cfg.norm_type == "rmsnorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * norm.weight
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + cfg.norm_eps) * norm.weight + norm.bias


def ref_activation(name, x):
    return {"swiglu": lambda a: a * torch.sigmoid(a), "silu": lambda a: a * torch.sigmoid(a),
            "gelu": lambda a: 0.5 * a * (1 + torch.erf(a / math.sqrt(2))), "relu": lambda a: a.clamp(min=0),
            "leaky_relu": lambda a: torch.where(a > 0, a, 0.01 * a)}[name](x)


def ref_mlp(mlp, x, cfg):
    if cfg.activation == "swiglu":
        h = ref_activation("silu", x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    else:
        h = ref_activation(cfg.activation, x @ mlp.up_proj.weight.T)
    return h @ mlp.down_proj.weight.T


def ref_frequencies(cfg):
    """Per dimension pair i: theta^(-2i/hd), or YaRN's NTK-by-parts blend from the paper (alpha=1, beta=32)."""
    hd = cfg.head_dim
    freqs = [cfg.rope_theta ** (-2 * i / hd) for i in range(hd // 2)]
    if cfg.positional_encoding != "yarn":
        return freqs
    s, L = cfg.rope_scaling_factor, cfg.original_max_seq_len
    out = []
    for f in freqs:
        r = L / (2 * math.pi / f)
        gamma = 0.0 if r < 1 else 1.0 if r > 32 else (r - 1) / (32 - 1)
        out.append((1 - gamma) * f / s + gamma * f)
    return out


def ref_rope(x, pos, cfg):
    """Rotate each pair (i, i + hd/2) of x (T, hd) by angle pos*freq_i, one pair at a time."""
    hd = cfg.head_dim
    out = x.clone()
    for i, f in enumerate(ref_frequencies(cfg)):
        angle = pos.double() * f
        c, s = torch.cos(angle).float(), torch.sin(angle).float()
        a, b = x[:, i], x[:, i + hd // 2]
        out[:, i], out[:, i + hd // 2] = a * c - b * s, a * s + b * c
    if cfg.positional_encoding == "yarn":
        out = out * (0.1 * math.log(cfg.rope_scaling_factor) + 1)
    return out


def ref_slopes(n):
    """The ALiBi paper's recipe, written independently of the library."""
    def pow2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start ** i for i in range(m)]
    if math.log2(n).is_integer():
        return pow2(n)
    m = 2 ** math.floor(math.log2(n))
    return pow2(m) + pow2(2 * m)[0::2][: n - m]


def ref_attention(attn, x, pos, cfg, doc_ids, kpm):
    """Naive softmax attention of one row x (T, D): explicit loops over heads and queries."""
    T, hd, H, K = x.shape[0], cfg.head_dim, cfg.n_heads, cfg.kv_heads

    def proj(lin):
        y = x @ lin.weight.T
        return y + lin.bias if lin.bias is not None else y

    q, k, v = proj(attn.q_proj), proj(attn.k_proj), proj(attn.v_proj)
    slopes = ref_slopes(H)
    out = torch.zeros(T, H * hd)
    for h in range(H):
        g = h // (H // K)  # the kv head this query head shares
        qh, kh, vh = q[:, h * hd:(h + 1) * hd], k[:, g * hd:(g + 1) * hd], v[:, g * hd:(g + 1) * hd]
        if cfg.positional_encoding in ("rope", "yarn"):
            qh, kh = ref_rope(qh, pos, cfg), ref_rope(kh, pos, cfg)
        for i in range(T):
            allowed = [j <= i and (not cfg.sliding_window or i - j < cfg.sliding_window)
                       and (doc_ids is None or doc_ids[j] == doc_ids[i]) and (kpm is None or bool(kpm[j]))
                       for j in range(T)]
            if not any(allowed):
                continue  # a pad query: nothing to compare
            scores = kh @ qh[i] / math.sqrt(hd)
            if cfg.positional_encoding == "alibi":
                scores = scores - slopes[h] * (i - torch.arange(T))
            scores = scores.masked_fill(~torch.tensor(allowed), float("-inf"))
            out[i, h * hd:(h + 1) * hd] = torch.softmax(scores, 0) @ vh
    return out @ attn.o_proj.weight.T


def ref_logits(model, ids, *, position_ids=None, doc_ids=None, key_padding_mask=None):
    cfg = model.cfg
    rows = []
    for b in range(ids.shape[0]):
        pos = position_ids[b] if position_ids is not None else torch.arange(ids.shape[1])
        x = model.embed_tokens.weight[ids[b]]
        if cfg.positional_encoding == "sinusoidal":
            x = x + ref_sinusoidal(cfg.max_seq_len, cfg.d_model)[pos]
        if cfg.positional_encoding == "learned":
            x = x + model.embed_positions.weight[pos]
        for layer in model.layers:
            x = x + ref_attention(layer.self_attn, ref_norm(layer.input_layernorm, x, cfg), pos, cfg,
                                  None if doc_ids is None else doc_ids[b],
                                  None if key_padding_mask is None else key_padding_mask[b])
            x = x + ref_mlp(layer.mlp, ref_norm(layer.post_attention_layernorm, x, cfg), cfg)
        rows.append(ref_norm(model.norm, x, cfg) @ model.lm_head.weight.T)
    return torch.stack(rows)


def ref_sinusoidal(n, d):
    table = torch.zeros(n, d)
    for pos in range(n):
        for i in range(0, d, 2):
            table[pos, i] = math.sin(pos / 10000 ** (i / d))
            table[pos, i + 1] = math.cos(pos / 10000 ** (i / d))
    return table


# ----------------------------------------------------------------------------- whole model vs reference


@option
@torch.no_grad()
def test_logits_match_reference(overrides):
    model = build(tiny(**overrides))
    ids = torch.randint(0, 61, (2, 12))
    torch.testing.assert_close(model(ids), ref_logits(model, ids), atol=1e-5, rtol=1e-4)


@option
@torch.no_grad()
def test_packed_docs_match_reference_and_separate_runs(overrides):
    model = build(tiny(**overrides))
    ids = torch.randint(0, 61, (1, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3])
    pos = packed_position_ids(doc_ids)
    packed = model(ids, doc_ids=doc_ids, position_ids=pos)
    torch.testing.assert_close(packed, ref_logits(model, ids, position_ids=pos, doc_ids=doc_ids), atol=1e-5, rtol=1e-4)
    for lo, hi in [(0, 5), (5, 9), (9, 12)]:
        torch.testing.assert_close(packed[:, lo:hi], model(ids[:, lo:hi]), atol=1e-5, rtol=1e-4)


@option
@torch.no_grad()
def test_padding_matches_unpadded_rows(overrides):
    """Left padding (with real-token positions) and right padding leave real tokens' logits unchanged."""
    model = build(tiny(**overrides))
    short, full = torch.randint(1, 61, (1, 7)), torch.randint(1, 61, (1, 10))
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)
    right = torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)
    ids, mask = torch.cat([left, full]), torch.ones(2, 10, dtype=torch.bool)
    mask[0, :3] = False
    out = model(ids, key_padding_mask=mask, position_ids=padded_position_ids(mask))
    assert torch.isfinite(out).all()  # pad queries see no key; they must not poison anything with NaN
    torch.testing.assert_close(out[0, 3:], model(short)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], model(full)[0], atol=1e-5, rtol=1e-4)
    ref = ref_logits(model, ids, position_ids=padded_position_ids(mask), key_padding_mask=mask)
    torch.testing.assert_close(out[0, 3:], ref[0, 3:], atol=1e-5, rtol=1e-4)
    rmask = torch.ones(1, 10, dtype=torch.bool)
    rmask[0, 7:] = False
    torch.testing.assert_close(model(right, key_padding_mask=rmask)[0, :7], model(short)[0], atol=1e-5, rtol=1e-4)


@option
@torch.no_grad()
def test_causal(overrides):
    model = build(tiny(**overrides))
    ids = torch.randint(0, 61, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 61
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)
    assert (a[:, 7] - b[:, 7]).abs().max() > 1e-4


@option
@torch.no_grad()
def test_kv_cache_matches_full_forward(overrides):
    model = build(tiny(**overrides))
    ids = torch.randint(0, 61, (2, 14))
    full = model(ids)
    cache = model.new_cache(2, 14)
    chunks = [model(ids[:, lo:hi], cache=cache) for lo, hi in [(0, 5), (5, 8), (8, 9), (9, 10), (10, 14)]]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- positional math


def test_rope_tables_and_rotation_match_reference():
    cfg = tiny(rope_theta=300.0)
    x, pos = torch.randn(2, 4, 9, cfg.head_dim), torch.arange(9)
    cos, sin = rope_tables(rope_frequencies(cfg.head_dim, cfg.rope_theta), 9)
    got = apply_rope(x, cos[None, None], sin[None, None])
    for b in range(2):
        for h in range(4):
            torch.testing.assert_close(got[b, h], ref_rope(x[b, h], pos, cfg), atol=1e-5, rtol=1e-5)


def test_yarn_frequencies_and_temperature_follow_the_paper():
    cfg = tiny(positional_encoding="yarn", original_max_seq_len=2048, rope_scaling_factor=4.0, d_model=128,
               n_heads=2, n_kv_heads=1, max_seq_len=8192)
    got = yarn_frequencies(cfg.head_dim, cfg.rope_theta, 4.0, 2048)
    torch.testing.assert_close(got, torch.tensor(ref_frequencies(cfg)), rtol=1e-5, atol=0)
    plain = rope_frequencies(cfg.head_dim, cfg.rope_theta)
    assert got[0] == plain[0] and torch.isclose(got[-1], plain[-1] / 4)  # fast dims kept, slow dims interpolated
    assert yarn_attention_scale(4.0) == pytest.approx(0.1 * math.log(4.0) + 1)


@torch.no_grad()
def test_yarn_with_factor_one_is_rope_and_extends_context():
    rope = build(tiny(max_seq_len=64))
    yarn1 = build(tiny(max_seq_len=64, positional_encoding="yarn", original_max_seq_len=64, rope_scaling_factor=1.0))
    ids = torch.randint(0, 61, (1, 20))
    torch.testing.assert_close(yarn1(ids), rope(ids), atol=1e-6, rtol=1e-5)
    # Trained at 32, extended by 2: runs at 64 tokens, and agrees with a cached decode.
    yarn = build(tiny(positional_encoding="yarn", original_max_seq_len=32, rope_scaling_factor=2.0, max_seq_len=64))
    ids = torch.randint(0, 61, (2, 64))
    out = yarn(ids)
    assert out.shape == (2, 64, 61) and torch.isfinite(out).all()
    cache = yarn.new_cache(2, 64)
    stepped = torch.cat([yarn(ids[:, :40], cache=cache)] + [yarn(ids[:, t:t + 1], cache=cache) for t in range(40, 64)], 1)
    torch.testing.assert_close(stepped, out, atol=1e-5, rtol=1e-4)


def test_alibi_slopes_match_the_paper():
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    for n in (1, 2, 3, 5, 6, 8, 12, 16):
        torch.testing.assert_close(alibi_slopes(n), torch.tensor(ref_slopes(n), dtype=torch.float32))


def test_sinusoidal_table_matches_formula():
    torch.testing.assert_close(sinusoidal_table(20, 16), ref_sinusoidal(20, 16), atol=1e-5, rtol=1e-5)


def test_position_id_helpers():
    doc = torch.tensor([[3, 3, 3, 7, 7, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert packed_position_ids(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))]
    mask = torch.tensor([[False, False, True, True, True], [True, True, True, True, False]])
    assert padded_position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


# ----------------------------------------------------------------------------- masks and the sliding window


def test_attention_mask_composes_causal_window_doc_and_padding():
    m = attention_mask(5, 5, window=2)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    # Two new queries after three cached keys, window 3.
    m = attention_mask(2, 5, past=3, window=3)[0, 0].int().tolist()
    assert m == [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    docs = torch.tensor([[0, 0, 1, 1]])
    pad = torch.tensor([[True, False, True, True]])
    m = attention_mask(4, 4, doc_ids=docs, key_padding_mask=pad)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


@torch.no_grad()
def test_sliding_window_limits_what_a_token_sees_with_and_without_cache():
    model = build(tiny(n_layers=1, sliding_window=3))
    ids = torch.randint(0, 61, (1, 12))
    changed = ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 61
    a, b = model(ids), model(changed)
    assert (a[0, :3] - b[0, :3]).abs().amax(-1).min() > 1e-5  # token 0 is in the window of 0, 1, 2
    torch.testing.assert_close(a[0, 3:], b[0, 3:], atol=0, rtol=0)  # and nobody else's
    cache = model.new_cache(1, 12)
    stepped = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(12)], 1)
    torch.testing.assert_close(stepped, a, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- config and validation


@pytest.mark.parametrize("overrides, message", [
    (dict(d_model=100, n_heads=3, n_kv_heads=1), "model.d_model (100) must be divisible by model.n_heads (3)"),
    (dict(n_kv_heads=3), "model.n_heads (4) must be divisible by model.n_kv_heads (3)"),
    (dict(attention_type="mha", n_kv_heads=2), "model.attention_type 'mha' needs model.n_kv_heads null or equal"),
    (dict(attention_type="mqa", n_kv_heads=2), "model.attention_type 'mqa' needs model.n_kv_heads null or 1"),
    (dict(n_kv_heads=None), "model.attention_type 'gqa' needs model.n_kv_heads set"),
    (dict(sliding_window=512, max_seq_len=256), "model.sliding_window (512) is larger than model.max_seq_len (256)"),
    (dict(positional_encoding="yarn"), "needs model.original_max_seq_len"),
    (dict(positional_encoding="yarn", original_max_seq_len=8, rope_scaling_factor=0.5),
     "needs model.rope_scaling_factor >= 1"),
    (dict(positional_encoding="nope"), "model.positional_encoding ('nope') must be one of: rope, yarn, alibi"),
    (dict(activation="tanh"), "model.activation ('tanh') must be one of: swiglu, gelu, relu, silu, leaky_relu"),
    (dict(norm_type="batchnorm"), "model.norm_type ('batchnorm') must be one of: rmsnorm, layernorm"),
    (dict(attention_type="mla"), "model.attention_type ('mla') must be one of: mha, mqa, gqa"),
    (dict(d_model=36, n_heads=4, n_kv_heads=2), "head dim model.d_model / model.n_heads (36/4 = 9) must be even"),
    (dict(n_layers=0), "model.n_layers (0) must be a positive integer"),
    (dict(vocab_size=2.5), "model.vocab_size (2.5) must be an integer"),
    (dict(dropout=1.0), "model.dropout (1.0) must be a number in [0, 1)"),
])
def test_validation_messages(overrides, message):
    with pytest.raises(LmforgeError) as err:
        tiny(**overrides).validate()
    assert message in str(err.value)


def test_from_dict_rejects_unknown_keys_and_round_trips():
    with pytest.raises(LmforgeError, match=r"model\.n_head, model\.widht"):
        ModelConfig.from_dict({"n_head": 4, "widht": 3})
    cfg = tiny(sliding_window=8, positional_encoding="alibi")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_default_sizes_and_parameter_counts():
    assert tiny(d_model=128, n_heads=4).ff_dim == 384  # 8/3*128 = 341 -> next multiple of 64
    assert tiny(activation="gelu").ff_dim == 128
    assert tiny(attention_type="mqa", n_kv_heads=None).kv_heads == 1
    assert tiny(attention_type="mha", n_kv_heads=None).kv_heads == 4
    tied, untied = Transformer(tiny()), Transformer(tiny(tie_embeddings=False))
    emb = 61 * 32
    assert untied.num_params() - tied.num_params() == emb
    assert tied.num_params(non_embedding=True) == tied.num_params() - emb
    assert sum(p.numel() for p in tied.state_dict().values()) - tied.num_params() == emb  # shared, listed twice
    learned = Transformer(tiny(positional_encoding="learned"))
    assert learned.num_params() - learned.num_params(non_embedding=True) == emb + 24 * 32
    assert not any("rope" in k for k in tied.state_dict())  # tables are derived, not saved


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = Transformer(tiny(d_model=256, n_heads=4, n_layers=8, vocab_size=1024))
    assert model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[3].self_attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.layers[3].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_too_long_sequence_is_a_clear_error():
    model = Transformer(tiny(max_seq_len=8))
    with pytest.raises(LmforgeError, match=r"9 tokens is longer than model.max_seq_len \(8\)"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_dropout_is_active_only_in_training():
    model = build(tiny(dropout=0.3))
    ids = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids))
        model.train()
        assert (model(ids) - model(ids)).abs().max() > 1e-4


# ----------------------------------------------------------------------------- reward and value heads


@torch.no_grad()
def test_reward_model_scores_last_real_token_of_each_row():
    torch.manual_seed(0)
    rm = RewardModel(build(tiny())).eval()
    a, b = torch.randint(1, 61, (1, 5)), torch.randint(1, 61, (1, 8))
    right = torch.zeros(2, 8, dtype=torch.long)
    right[0, :5], right[1] = a[0], b[0]
    mask = right != 0
    scores = rm(right, mask)
    assert scores.shape == (2,)
    torch.testing.assert_close(scores, torch.cat([rm(a), rm(b)]), atol=1e-5, rtol=1e-4)
    left = torch.zeros(2, 8, dtype=torch.long)
    left[0, 3:], left[1] = a[0], b[0]
    torch.testing.assert_close(rm(left, left != 0), scores, atol=1e-5, rtol=1e-4)
    h = rm.trunk.hidden_states(a)[0, -1]
    torch.testing.assert_close(rm(a)[0], h @ rm.score_head.weight[0] + rm.score_head.bias[0])


@torch.no_grad()
def test_value_model_gives_per_token_values():
    vm = ValueModel(build(tiny())).eval()
    ids = torch.randint(1, 61, (2, 9))
    values = vm(ids)
    assert values.shape == (2, 9)
    torch.testing.assert_close(values, vm.trunk.hidden_states(ids) @ vm.value_head.weight[0] + vm.value_head.bias)


# ----------------------------------------------------------------------------- Hugging Face parity


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@torch.no_grad()
def test_logits_match_transformers(family):
    """Against the eager (explicit softmax) attention; the names and config keys are lmforge.hf's mapping,
    which tests/test_hf.py also checks through a saved folder."""
    transformers = pytest.importorskip("transformers")
    from lmforge.hf import hf_config, to_hf_state_dict

    cfg = tiny(vocab_size=97, d_model=64, n_heads=8, n_kv_heads=2, max_seq_len=32, rope_theta=5000.0,
               attention_bias=family == "qwen2")
    ours = build(cfg)
    hf_cfg = transformers.AutoConfig.for_model(**hf_config(cfg))
    hf_cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert hf_cfg.model_type == family
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected and missing == ["lm_head.weight"]  # tied: transformers shares the embedding
    hf.eval()
    ids = torch.randint(0, 97, (2, 32))
    expected = hf(input_ids=ids).logits
    assert (ours(ids) - expected).abs().max().item() <= 1e-4
