"""Training tokens/s and peak memory (RSS) of lmforge at three model sizes, each in its own process.

    .venv/bin/python bench/scaling.py [--steps 6] [--threads 2] [--sizes 1M 5M 20M]

Each size runs in a fresh subprocess, so its peak RSS is its own: the import of
torch (reported as "base RSS") plus the model, its gradients, AdamW's two
moments and the activations of one step. A step is the library's training step
(``lm_loss``, fused AdamW, fp32); tokens/s is the median over the timed steps
after 2 warm-up steps, MFU = 6 * N * tokens/s over the fp32 matmul peak that
the subprocess measures itself.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SIZES = {
    # the embedded default (config/config.yaml): vocab 2048, d 128, 4 layers, seq 128, batch 16
    "1M": (dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128), 16),
    # the peer benchmark's model (bench/train_speed.py), batch 8 x 256
    "5M": (dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=688, max_seq_len=256), 8),
    "20M": (dict(vocab_size=8192, d_model=512, n_layers=6, n_heads=8, n_kv_heads=2, d_ff=1376, max_seq_len=256), 8),
}


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(size: str, steps: int, threads: int) -> dict:
    import torch

    from lmforge.model import ModelConfig, Transformer
    from lmforge.train.lm import lm_loss
    from lmforge.train.optim import build_optimizer

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from train_speed import matmul_peak

    torch.set_num_threads(threads)
    base = rss_mb()
    cfg_dict, batch = SIZES[size]
    cfg = ModelConfig.from_dict(cfg_dict)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = build_optimizer(model, name="adamw", lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(2 + steps):
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1), generator=g)
        t = time.perf_counter()
        loss, _ = lm_loss(model, (x[:, :-1], x[:, 1:]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    tps = batch * cfg.max_seq_len / statistics.median(times)
    n = model.num_params()
    peak = max(matmul_peak(torch.device("cpu")).values())  # the best kernel library's, as train_speed.py
    return {"size": size, "n_params": n, "batch": batch, "seq": cfg.max_seq_len, "tokens_per_s": tps,
            "mfu": 6 * n * tps / peak, "base_rss_mb": base, "peak_rss_mb": rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--child", choices=list(SIZES), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads)))
        return
    rows = []
    print(f"{'size':>5} {'params':>11} {'batch x seq':>11} {'tokens/s':>9} {'MFU':>6} {'base RSS':>9} {'peak RSS':>9}")
    for size in args.sizes:
        proc = subprocess.run([sys.executable, __file__, "--child", size, "--steps", str(args.steps),
                               "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{size:>5} {r['n_params']:>11,} {r['batch']:>5} x {r['seq']:<3} {r['tokens_per_s']:>9.0f} "
              f"{r['mfu']:>6.1%} {r['base_rss_mb']:>6.0f} MB {r['peak_rss_mb']:>6.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
