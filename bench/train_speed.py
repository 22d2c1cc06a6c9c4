"""Training tokens/s: lmforge's Transformer vs transformers' LlamaForCausalLM, same config, same process.

    .venv/bin/python bench/train_speed.py [--steps 12] [--threads 2]

Config (the reference peer setup): vocab 8192, d 256, 4 layers, 8 heads / 2 kv
heads, ffn 688, tied embeddings, batch 8 x 256, AdamW, fp32. The two models
take turns step by step so machine noise hits both alike; we report the median
step after warm-up, and MFU = 6 * N * tokens/s over this machine's fp32 matmul
peak, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer

CFG = dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=688, max_seq_len=256,
           attention_type="gqa", tie_embeddings=True)
BATCH, SEQ = 8, 256


def matmul_peak(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def hf_model(cfg: ModelConfig):
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=True, attention_bias=False)
    hf_cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(hf_cfg)


def step_fn(model, logits_of):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)

    def step() -> float:
        x = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ + 1), generator=g)
        t = time.perf_counter()
        logits = logits_of(model, x[:, :-1])
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(CFG)
    ours = Transformer(cfg)
    peer = hf_model(cfg)
    n_params = sum(p.numel() for p in ours.parameters())
    steps = {"lmforge": step_fn(ours, lambda m, x: m(x)),
             "transformers": step_fn(peer, lambda m, x: m(input_ids=x).logits)}
    times = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for name, fn in steps.items():
            dt = fn()
            if i >= args.warmup:
                times[name].append(dt)
    peak = matmul_peak()
    tokens = BATCH * SEQ
    out = {"n_params": n_params, "tokens_per_step": tokens, "threads": args.threads,
           "matmul_peak_gflops": peak / 1e9, "steps_timed": args.steps}
    for name, ts in times.items():
        tps = tokens / statistics.median(ts)
        out[name] = {"tokens_per_s": tps, "mfu": 6 * n_params * tps / peak}
    out["speedup"] = out["lmforge"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    print(f"params {n_params:,}  fp32 matmul peak {peak / 1e9:.0f} GFLOP/s  ({args.threads} threads)")
    for name in steps:
        print(f"{name:>13}: {out[name]['tokens_per_s']:8.0f} tokens/s  MFU {out[name]['mfu']:.1%}")
    print(f"      speedup: {out['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
