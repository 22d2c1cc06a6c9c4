"""The CUDA paths against the CPU ones: every architecture option, bf16 autocast training, decoding, memory.

CI has no GPU, so these are skipped there; on a CUDA machine run `pytest tests/test_cuda.py`
(bench/gpu_check.sh does, along with the pipeline and the benches on the GPU).
"""
import pytest
import torch
import torch.nn.functional as F

from test_model import OPTIONS, build, tiny

from lmforge import estimate as E
from lmforge.device import autocast
from lmforge.generate import generate
from lmforge.model import ModelConfig, Transformer, padded_position_ids
from lmforge.train.lm import lm_loss
from lmforge.train.optim import build_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
option = pytest.mark.parametrize("overrides", list(OPTIONS.values()), ids=list(OPTIONS))


@option
@torch.no_grad()
def test_fp32_logits_on_cuda_match_the_cpu(overrides):
    """The GPU's SDPA kernels (flash / memory-efficient / masked) against the CPU path, with padding."""
    model = build(tiny(**overrides))
    ids = torch.randint(1, 61, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :3] = False
    pos = padded_position_ids(mask)
    cpu_plain, cpu_padded = model(ids), model(ids, key_padding_mask=mask, position_ids=pos)
    model.to(CUDA)
    gpu_plain = model(ids.to(CUDA)).cpu()
    gpu_padded = model(ids.to(CUDA), key_padding_mask=mask.to(CUDA), position_ids=pos.to(CUDA)).cpu()
    torch.testing.assert_close(gpu_plain, cpu_plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu_padded[0, 3:], cpu_padded[0, 3:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu_padded[1], cpu_padded[1], atol=1e-4, rtol=1e-4)


@option
@torch.no_grad()
def test_kv_cache_on_cuda_matches_the_full_forward(overrides):
    model = build(tiny(**overrides)).to(CUDA)
    ids = torch.randint(0, 61, (2, 14), device=CUDA)
    full = model(ids)
    cache = model.new_cache(2, 14)
    chunks = [model(ids[:, lo:hi], cache=cache) for lo, hi in [(0, 5), (5, 8), (8, 9), (9, 14)]]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides", [OPTIONS["rope-gqa-swiglu-rmsnorm"], OPTIONS["alibi-window-mha"]],
                         ids=["rope-gqa", "alibi-window"])
def test_fused_loss_under_bf16_autocast_matches_the_unfused_one(overrides):
    """lm_loss (fused head + cross-entropy, fp32 softmax) vs logits -> F.cross_entropy, both under autocast."""
    torch.manual_seed(0)
    model = Transformer(tiny(**overrides)).to(CUDA)
    x, y = torch.randint(0, 61, (2, 4, 16), device=CUDA)
    with autocast(CUDA):
        fused, _ = lm_loss(model, (x, y))
    g_fused = torch.autograd.grad(fused, list(model.parameters()))
    with autocast(CUDA):
        logits = model(x).float()
    plain = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    g_plain = torch.autograd.grad(plain, list(model.parameters()))
    torch.testing.assert_close(fused, plain, atol=1e-2, rtol=1e-2)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)


def test_bf16_training_steps_on_cuda_fit_a_batch():
    """Fused AdamW + autocast + the fused loss on the GPU: 40 steps on one batch drive its loss down."""
    torch.manual_seed(0)
    model = Transformer(tiny()).to(CUDA)
    opt = build_optimizer(model, name="adamw", lr=3e-3)
    x, y = torch.randint(0, 61, (2, 8, 16), device=CUDA)
    losses = []
    for _ in range(40):
        with autocast(CUDA):
            loss, _ = lm_loss(model, (x, y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_greedy_decoding_on_cuda_gives_the_cpu_tokens(compile):
    torch.manual_seed(0)
    model = build(tiny(max_seq_len=64))
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11]]
    cpu = generate(model, prompts, max_new_tokens=20, temperature=0).tokens
    gpu = generate(model.to(CUDA), prompts, max_new_tokens=20, temperature=0, compile=compile).tokens
    assert gpu == cpu


def test_sampling_on_cuda_is_reproducible_from_its_seed():
    model = build(tiny(max_seq_len=64)).to(CUDA)

    def sample(seed):
        g = torch.Generator(device=CUDA).manual_seed(seed)
        return generate(model, [[1, 2, 3]] * 4, max_new_tokens=16, temperature=1.0, top_p=0.9, generator=g).tokens

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_training_memory_estimate_against_the_measured_cuda_peak():
    """Estimate (bf16 autocast) vs torch.cuda.max_memory_allocated over 2 AdamW steps, batch 8 x 128.

    The CUDA allocator counts exactly the tensors' blocks (no page cache, no fragmentation
    of the host heap), so the band is narrower than the CPU's RSS test: within -15 % / +30 %."""
    cfg = ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128)
    torch.manual_seed(0)
    t = torch.randint(0, cfg.vocab_size, (8, 129), device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = Transformer(cfg).to(CUDA)
    opt = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        with autocast(CUDA):
            loss, _ = lm_loss(model, (t[:, :-1], t[:, 1:]))
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    est = E.training_memory(cfg, batch_size=8, seq_len=128, dtype="bf16").total
    print(f"cuda peak {measured / 2**20:.1f} MiB, estimate {est / 2**20:.1f} MiB")
    assert 0.85 * measured <= est <= 1.3 * measured, (est, measured)
