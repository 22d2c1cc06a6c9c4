"""NF4 quantization: the code values, the quantizer against a hand-written codebook lookup, packing,
double quantization, the quantized modules and a QLoRA training step."""
import math

import torch
import torch.nn.functional as F

from lmforge.lora import LoraConfig, apply_lora, merge_lora
from lmforge.model import ModelConfig, Transformer
from lmforge.quant import (NF4_CODE, NF4Embedding, NF4Linear, NF4Weight, dequantize_absmax, nf4_indices,
                           quantize_absmax, quantize_model, quantize_nf4, weight_nbytes)

CODE = torch.tensor(NF4_CODE)


def tiny(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    return Transformer(ModelConfig(**{**cfg, **overrides}))


def reference_quantize(w: torch.Tensor, block: int = 64) -> tuple[list[int], list[float]]:
    """The QLoRA quantizer written out: per block of 64 values (row-major), divide by the block's
    absmax and take the index of the nearest code value. Returns (indices, absmax per block)."""
    flat = w.reshape(-1).tolist()
    indices, scales = [], []
    for start in range(0, len(flat), block):
        chunk = flat[start:start + block]
        absmax = max(abs(v) for v in chunk)
        scales.append(absmax)
        for v in chunk:
            x = v / absmax if absmax > 0 else 0.0
            indices.append(min(range(16), key=lambda i: abs(x - NF4_CODE[i])))
    return indices, scales


def test_code_values_are_the_papers_normal_quantiles():
    """NF4 = 8 quantiles of N(0,1) at or above 0 and 7 below, from the offset 0.9677 (QLoRA appendix E),
    each side scaled to [-1, 1], with an exact 0 between them."""
    offset = 0.9677083
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    values = values / values.abs().max()
    assert len(NF4_CODE) == 16 and NF4_CODE[7] == 0.0 and NF4_CODE[0] == -1.0 and NF4_CODE[-1] == 1.0
    torch.testing.assert_close(values.float(), CODE, atol=2e-6, rtol=0)


def test_quantizer_matches_the_codebook_lookup_reference():
    torch.manual_seed(0)
    w = torch.randn(24, 40) * 0.05  # 960 values: 15 blocks that straddle rows
    w[3, :] = 0.0                   # an all-zero stretch
    packed, absmax = quantize_nf4(w)
    ref_idx, ref_scale = reference_quantize(w)
    assert nf4_indices(packed)[: w.numel()].tolist() == ref_idx
    torch.testing.assert_close(absmax, torch.tensor(ref_scale), atol=0, rtol=0)
    expected = torch.tensor([NF4_CODE[i] * ref_scale[j // 64] for j, i in enumerate(ref_idx)]).view(24, 40)
    torch.testing.assert_close(NF4Weight(w).dequantize(), expected, atol=1e-7, rtol=0)


def test_round_trip_error_is_within_half_the_widest_code_gap():
    torch.manual_seed(1)
    w = torch.randn(128, 96)
    q = NF4Weight(w)
    err = (q.dequantize() - w).abs().view(-1, 64)
    half_gap = (CODE[1:] - CODE[:-1]).max().item() / 2  # 0.1385: between 0.7230 and 1
    bound = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True) * half_gap
    assert (err <= bound + 1e-7).all()
    # The block maxima are codes themselves (+-1 times absmax): reproduced exactly.
    i = w.reshape(-1, 64).abs().argmax(dim=1)
    torch.testing.assert_close(q.dequantize().reshape(-1, 64).gather(1, i[:, None]),
                               w.reshape(-1, 64).gather(1, i[:, None]), atol=1e-7, rtol=0)
    # Typical error of normal weights: well under a tenth of the block scale.
    assert (err / bound * half_gap).mean() < 0.05


def test_storage_is_four_bits_a_weight_plus_constants():
    w = torch.randn(256, 128)
    n = w.numel()
    q = NF4Weight(w)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == n // 2
    assert q.absmax.dtype == torch.float32 and q.absmax.numel() == n // 64
    assert q.nbytes() == n // 2 + 4 * n // 64                          # 4.5 bits a weight
    dq = NF4Weight(w, double_quant=True)
    assert dq.absmax_q.dtype == torch.int8 and dq.absmax_scale.numel() == math.ceil(n / 64 / 256)
    assert dq.nbytes() == n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4   # ~4.13 bits a weight
    assert 8 * dq.nbytes() / n < 4.14 and 8 * q.nbytes() / n == 4.5
    # An odd element count pads its last byte and block.
    odd = NF4Weight(torch.randn(5, 13))
    assert odd.packed.numel() == 33 and odd.absmax.numel() == 2 and odd.dequantize().shape == (5, 13)


def test_double_quantization_of_the_block_scales():
    torch.manual_seed(2)
    absmax = torch.rand(700) * 0.1 + 0.02
    q, scale, mean = quantize_absmax(absmax)
    assert q.dtype == torch.int8 and scale.numel() == 3   # blocks of 256
    back = dequantize_absmax(q, scale, mean)
    # Centred values in [-scale, scale] on 255 levels: error at most half a step.
    step = scale.repeat_interleave(256)[:700] / 127
    assert ((back - absmax).abs() <= step / 2 + 1e-7).all()
    w = torch.randn(64, 64)
    torch.testing.assert_close(NF4Weight(w, double_quant=True).dequantize(), NF4Weight(w).dequantize(),
                               atol=0.01 * w.abs().max().item(), rtol=0)


def test_nf4_modules_compute_with_the_dequantized_weight():
    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 48, bias=True)
    q = NF4Linear.from_linear(lin)
    x = torch.randn(5, 7, 64, requires_grad=True)
    w = q.quantized.dequantize()
    torch.testing.assert_close(q(x), F.linear(x, w, lin.bias), atol=1e-6, rtol=0)
    # The input gradient is grad @ W (the weight is frozen and holds no gradient).
    g = torch.randn(5, 7, 48)
    q(x).backward(g)
    torch.testing.assert_close(x.grad, g @ w, atol=1e-5, rtol=0)
    emb = torch.nn.Embedding(50, 24)
    qe = NF4Embedding(NF4Weight(emb.weight))
    ids = torch.tensor([[0, 7, 49], [3, 3, 21]])
    torch.testing.assert_close(qe(ids), qe.weight[ids], atol=0, rtol=0)  # row lookup == full table lookup


def test_quantized_model_memory_and_tied_head():
    model = tiny()
    fp32 = weight_nbytes(model)
    quantize_model(model)
    assert isinstance(model.embed_tokens, NF4Embedding) and isinstance(model.lm_head, NF4Linear)
    assert model.lm_head.quantized is model.embed_tokens.quantized  # the tied table is stored once
    nf4 = weight_nbytes(model)
    assert fp32 / nf4 > 6  # matrices at 4.5 bits; only the norms stay float32
    x = torch.randint(0, 320, (2, 12))
    assert torch.isfinite(model(x)).all()


def test_qlora_training_step_updates_only_the_adapters():
    model = tiny(dropout=0.0)
    apply_lora(model, LoraConfig(r=4, quantize="nf4", double_quant=True))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(k.endswith(("packed", "absmax_q", "absmax_scale", "absmax_mean")) or "norm" in k for k in frozen)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 320, (4, 16))
    losses = []
    for _ in range(4):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # base bit for bit as loaded
    # Merging dequantizes the base and folds the adapters in: the same function, plain float32 modules.
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        merge_lora(model)
        merged = model(x)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.embed_tokens.weight
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
