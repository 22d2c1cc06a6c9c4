"""Training tokens/s: lmforge's Transformer vs transformers' LlamaForCausalLM, same config, same process.

    .venv/bin/python bench/train_speed.py [--steps 12] [--threads 2] [--ablate] [--compile]
                                          [--device cuda] [--batch 8] [--chunk-elements N ...]

Config (the reference peer setup): vocab 8192, d 256, 4 layers, 8 heads / 2 kv
heads, ffn 688, tied embeddings, batch 8 x 256, AdamW, fp32. A step is forward,
loss, backward, AdamW step, zero_grad(set_to_none). Ours is the library's own
step: ``lm_loss`` (fused linear cross-entropy) and ``build_optimizer("adamw")``
(fused AdamW). Theirs is logits -> F.cross_entropy -> fused AdamW, with the
same AdamW settings.
The contestants take turns step by step so machine noise hits all alike; we
report the median step after warm-up, and MFU = 6 * N * tokens/s over this
machine's fp32 matmul peak, measured in the same run: the best of MKL's and oneDNN's
products, which differ by 2x on CPUs whose AVX-512 MKL does not use (AMD's).

--ablate adds "lmforge, unfused loss" (logits -> F.cross_entropy, as theirs);
--compile adds "lmforge, compiled" (``Transformer.torch_compile``: the trunk through
torch.compile; its first step, which includes compiling, is reported).
--chunk-elements N adds "lmforge, chunk N": the fused loss with N logits per chunk instead of
``lmforge.kernels.CHUNK_ELEMENTS`` (sized for CPU caches; fewer, bigger chunks launch fewer kernels on a GPU).
--device cuda runs both on the GPU under bf16 autocast (what the training loop uses there), with
the GPU synchronised around each timed step, and MFU against a bf16 matmul peak measured there.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.device import autocast
from lmforge.model import ModelConfig, Transformer
from lmforge.train.lm import lm_loss
from lmforge.train.optim import build_optimizer

CFG = dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=688, max_seq_len=256,
           attention_type="gqa", tie_embeddings=True)
BATCH, SEQ = 8, 256


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, reps: int = 20) -> dict[str, float]:
    """Best FLOP/s of an n x n matmul per kernel library: fp32 (n 1024) on the CPU's thread setting
    through MKL (torch.mm) and through oneDNN, bf16 (n 8192) on CUDA. The peak is the best of them."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    products = {"cuBLAS" if device.type == "cuda" else "MKL": lambda: a @ b}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        products["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    peaks = {}
    for name, product in products.items():
        for _ in range(3):
            product()
        times = []
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            product()
            sync(device)
            times.append(time.perf_counter() - t)
        peaks[name] = 2 * n**3 / min(times)
    return peaks


def hf_model(cfg: ModelConfig):
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True,
        attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    hf_cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(hf_cfg)


def logits_loss(logits_of):
    def loss_of(model, x, y):
        logits = logits_of(model, x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    return loss_of


def step_fn(model, loss_of, optimizer, device: torch.device, batch: int):
    g = torch.Generator().manual_seed(0)

    def step() -> float:
        x = torch.randint(0, CFG["vocab_size"], (batch, SEQ + 1), generator=g).to(device)
        sync(device)
        t = time.perf_counter()
        with autocast(device):
            loss = loss_of(model, x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t
    return step


def chunked_loss(elements: int):
    """lm_loss with the fused loss's chunk set to ``elements`` logits for this call only."""
    def loss_of(m, x, y):
        default, kernels.CHUNK_ELEMENTS = kernels.CHUNK_ELEMENTS, elements
        try:
            return lm_loss(m, (x, y))[0]
        finally:
            kernels.CHUNK_ELEMENTS = default
    return loss_of


def contestants(cfg: ModelConfig, ablate: bool, compile_: bool, device: torch.device,
                chunk_elements: tuple[int, ...] = ()) -> dict:
    """name -> (model, loss_of(model, x, y), optimizer); every lmforge model starts from the same weights."""
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device)

    def ours_copy():
        m = Transformer(cfg).to(device)
        m.load_state_dict(ours.state_dict())
        return m

    def adamw(model):
        return build_optimizer(model, name="adamw", lr=1e-4)

    def hf_adamw(model):  # the same settings as ours: fused AdamW, no weight decay
        return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)

    out = {"lmforge": (ours, lambda m, x, y: lm_loss(m, (x, y))[0], adamw(ours))}
    peer = hf_model(cfg).to(device)
    out["transformers"] = (peer, logits_loss(lambda m, x: m(input_ids=x).logits), hf_adamw(peer))
    if ablate:
        m = ours_copy()
        out["lmforge, unfused loss"] = (m, logits_loss(lambda m, x: m(x)), adamw(m))
    for elements in chunk_elements:
        m = ours_copy()
        out[f"lmforge, chunk {elements}"] = (m, chunked_loss(elements), adamw(m))
    if compile_:
        # A fresh inductor cache: the reported first step is a cold compile, as on a new machine.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
        m = ours_copy()
        m.torch_compile = True  # the trunk compiles; the fused loss stays eager
        out["lmforge, compiled"] = (m, lambda m, x, y: lm_loss(m, (x, y))[0], adamw(m))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ablate", action="store_true", help="also time lmforge with the unfused loss")
    ap.add_argument("--compile", action="store_true", help="also time lmforge under torch.compile")
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 autocast)")
    ap.add_argument("--batch", type=int, default=BATCH, help="sequences of 256 tokens per step")
    ap.add_argument("--chunk-elements", type=int, nargs="*", default=[],
                    help="also time the fused loss with these chunk sizes (logits per chunk)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig.from_dict(CFG)
    runs = contestants(cfg, args.ablate, args.compile, device, tuple(args.chunk_elements))
    n_params = runs["lmforge"][0].num_params()
    steps = {name: step_fn(*run, device, args.batch) for name, run in runs.items()}
    times = {k: [] for k in steps}
    first = {}
    for i in range(args.warmup + args.steps):
        for name, fn in steps.items():
            dt = fn()
            if i == 0:
                first[name] = dt  # includes compilation for a compiled model
            if i >= args.warmup:
                times[name].append(dt)
    peaks = matmul_peak(device)
    peak = max(peaks.values())
    tokens = args.batch * SEQ
    out = {"n_params": n_params, "tokens_per_step": tokens, "threads": args.threads, "device": str(device),
           "matmul_peak_gflops": peak / 1e9,
           "matmul_peaks_gflops": {k: v / 1e9 for k, v in peaks.items()}, "steps_timed": args.steps}
    for name, ts in times.items():
        tps = tokens / statistics.median(ts)
        out[name] = {"tokens_per_s": tps, "mfu": 6 * n_params * tps / peak, "step_s": statistics.median(ts),
                     "first_step_s": first[name]}
    base = out["transformers"]["tokens_per_s"]
    where = torch.cuda.get_device_name(device) + ", bf16" if device.type == "cuda" else f"{args.threads} threads, fp32"
    each = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items())
    print(f"params {n_params:,}  batch {args.batch}x{SEQ}  matmul peak {peak / 1e9:.0f} GFLOP/s ({each}; {where})")
    for name in steps:
        r = out[name]
        r["vs_transformers"] = r["tokens_per_s"] / base
        extra = f"  (first step {r['first_step_s']:.1f}s)" if "compiled" in name else ""
        print(f"{name:>22}: {r['tokens_per_s']:8.0f} tokens/s  MFU {r['mfu']:.1%}  "
              f"{r['vs_transformers']:.2f}x transformers{extra}")
    out["speedup"] = out["lmforge"]["vs_transformers"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
