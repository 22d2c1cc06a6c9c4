"""Memory of full fine-tuning, LoRA and QLoRA: weight bytes, peak RSS of SFT, held-out loss gap.

    .venv/bin/python bench/lora_memory.py [--base results/pretrain/model.pt] [--steps 30] [--gap-steps 300]

Three tables, printed as markdown:

1. Weights of the CPU-small preset's model (config/presets/cpu-small.yaml: vocab
   4096, d 256, 4 layers, 8 heads / 2 kv heads, ffn 688; random weights, since
   bytes do not depend on values): float32 vs NF4 vs NF4 + double quantization,
   the LoRA adapters (r 8 on all seven projections), and the time of one
   no-grad forward of a batch of 8 x 256 tokens.
2. Peak RSS (``ru_maxrss``) of ``--steps`` SFT steps on that model, batch 8
   packed rows of 256 tokens, each configuration in a fresh subprocess; the
   "over baseline" column subtracts the process's peak just before the model
   is loaded (interpreter, torch, the encoded data).
3. Held-out SFT loss after ``--gap-steps`` steps from ``--base`` (a pretrained
   checkpoint: the default config's, since pretraining the CPU-small model
   takes 15-20 min), for full fine-tuning, LoRA and QLoRA at equal steps, and
   the size of what each run saves.

Every subprocess uses ``--threads`` torch threads (default 1: the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "config/presets/cpu-small.yaml"
LORA = {"r": 8, "alpha": 16}
RUNS = {  # name -> the sft section's memory options
    "full fine-tuning": {},
    "LoRA r8": {"lora": LORA},
    "QLoRA r8 (nf4)": {"lora": {**LORA, "quantize": "nf4"}},
    "QLoRA r8 (nf4 + double quant)": {"lora": {**LORA, "quantize": "nf4", "double_quant": True}},
    "full fine-tuning + grad checkpointing": {"gradient_checkpointing": True},
    "QLoRA r8 (nf4 + dq) + grad checkpointing": {"lora": {**LORA, "quantize": "nf4", "double_quant": True},
                                                 "gradient_checkpointing": True},
}
GAP_RUNS = ("full fine-tuning", "LoRA r8", "QLoRA r8 (nf4)", "QLoRA r8 (nf4 + double quant)")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_small_config() -> dict:
    import dataclasses

    from lmforge.config import apply_schema
    from lmforge.model import ModelConfig

    preset = yaml.safe_load(PRESET.read_text())
    known = {f.name for f in dataclasses.fields(ModelConfig)}  # the architecture, not e.g. model.init_from
    return {k: v for k, v in apply_schema({"model": preset["model"]})["model"].items() if k in known}


# --------------------------------------------------------------------------- worker: one SFT run


def worker(job: dict) -> dict:
    """Run ``job['steps']`` SFT steps from ``job['base']`` with the memory options ``job['options']``."""
    from lmforge.loader import load_model, read_checkpoint
    from lmforge.config import TrainConfig, apply_schema
    from lmforge.data.builtin import make_task_data
    from lmforge.data.formats import load_sft
    from lmforge.device import seed_everything
    from lmforge.stages.common import memory_options
    from lmforge.loader import save_adapter
    from lmforge.lora import has_adapters
    from lmforge.checkpoint import save_model
    from lmforge.train.loop import train
    from lmforge.train.sft import SFTBatches, encode_conversations, evaluate_sft, sft_loss

    torch.set_num_threads(job["threads"])
    seed_everything(0)
    ckpt = read_checkpoint(job["base"])
    tok_seq = ckpt["model_config"]["max_seq_len"]
    from lmforge.tokenizer import LMTokenizer

    tok = LMTokenizer.from_str(ckpt["tokenizer"])
    data = make_task_data(apply_schema({})["data"]["builtin"], 0)
    train_ex, _ = encode_conversations(tok, load_sft(data["sft_train"], name="builtin:sft_train"), tok_seq)
    val_ex, _ = encode_conversations(tok, load_sft(data["sft_val"], name="builtin:sft_val"), tok_seq)
    batching = dict(seq_len=tok_seq, pad_id=tok.pad_id, seed=0, packing=True, batch_size=job["batch_size"])
    train_b, val_b = SFTBatches(train_ex, **batching), SFTBatches(val_ex, **batching)
    del ckpt
    baseline = peak_rss_mb()

    model, tok, ckpt = load_model(job["base"])
    memory_options(model, job["options"], "sft")
    lr = job["lr_lora"] if job["options"].get("lora") else job["lr_full"]
    section = apply_schema({"sft": {"max_steps": job["steps"], "lr": lr, "warmup_steps": min(10, job["steps"] - 1),
                                    "batch_size": job["batch_size"], "eval_every": 0, "checkpoint_every": 0,
                                    "log_every": 10 ** 6, "resume": False, "save_best_only": False}})["sft"]
    tcfg = TrainConfig.from_dict(section, key="sft")
    with tempfile.TemporaryDirectory() as ckpt_dir:
        t0 = time.perf_counter()
        result = train(model, stage="sft", cfg=tcfg, model_config=ckpt["model_config"], batch_fn=train_b.batch,
                       loss_fn=sft_loss, eval_fn=None, ckpt_dir=ckpt_dir, device=torch.device("cpu"),
                       fingerprint={})
        wall = time.perf_counter() - t0
        peak = peak_rss_mb()
        out = {"peak_rss_mb": peak, "baseline_mb": baseline, "s_per_step": wall / result.step}
        if job.get("eval"):
            model.eval()
            out["val_loss"] = evaluate_sft(model, val_b)["val_loss"]
            saved = Path(ckpt_dir) / "model.pt"
            if has_adapters(model):
                save_adapter(saved, model, base=job["base"], kind="causal_lm", model_config=ckpt["model_config"],
                             tokenizer=tok, meta={})
            else:
                save_model(saved, model, kind="causal_lm", model_config=ckpt["model_config"], tokenizer=tok, meta={})
            out["saved_bytes"] = saved.stat().st_size
    return out


def run_worker(job: dict) -> dict:
    """``worker(job)`` in a fresh interpreter, so ru_maxrss is this configuration's alone."""
    # A fixed mmap threshold makes glibc return every freed tensor of 128 KiB or more to the system at
    # once; with its default (a threshold that grows as memory is freed) the heap keeps freed tensors,
    # and the peak RSS measures the allocator's history as much as the live tensors.
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        raise SystemExit(f"worker failed: {job}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- tables


def weights_table(threads: int) -> str:
    from lmforge.lora import LoraConfig, adapter_state, apply_lora
    from lmforge.model import ModelConfig, Transformer
    from lmforge.quant import quantize_model, weight_nbytes

    torch.set_num_threads(threads)
    cfg = ModelConfig.from_dict(cpu_small_config())
    x = torch.randint(0, cfg.vocab_size, (8, cfg.max_seq_len))
    rows = []
    for name, quant in (("float32", None), ("nf4", False), ("nf4 + double quant", True)):
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        if quant is not None:
            quantize_model(model, double_quant=quant)
        nbytes = weight_nbytes(model)
        with torch.no_grad():
            model(x)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t)
        rows.append((name, nbytes, min(times)))
    fp32 = rows[0][1]
    lines = ["| base weights | bytes | float32 / this | bits / weight | forward 8x256, no grad |", "|---|---|---|---|---|"]
    n_params = Transformer(cfg).num_params()
    for name, nbytes, t in rows:
        lines.append(f"| {name} | {nbytes:,} | {fp32 / nbytes:.2f} | {8 * nbytes / n_params:.2f} | "
                     f"{1000 * t:.0f} ms |")
    model = apply_lora(Transformer(cfg), LoraConfig.from_dict(LORA))
    adapters = sum(t.numel() * t.element_size() for t in adapter_state(model).values())
    lines.append(f"| LoRA adapters (r 8, all 7 projections, float32) | {adapters:,} | "
                 f"{100 * adapters / fp32:.1f} % of float32 | | |")
    return (f"Model: config/presets/cpu-small.yaml ({n_params:,} parameters, tied embeddings); "
            f"norms stay float32.\n\n" + "\n".join(lines))


def rss_table(base: str, steps: int, threads: int) -> str:
    lines = ["| run | peak RSS | over baseline | s / step |", "|---|---|---|---|"]
    for name, options in RUNS.items():
        r = run_worker({"base": base, "options": options, "steps": steps, "threads": threads, "batch_size": 8,
                        "lr_full": 1e-3, "lr_lora": 1e-3})
        lines.append(f"| {name} | {r['peak_rss_mb']:.0f} MB | {r['peak_rss_mb'] - r['baseline_mb']:.0f} MB | "
                     f"{r['s_per_step']:.2f} |")
        print(f"  {name}: {r}", file=sys.stderr, flush=True)
    return "\n".join(lines)


def gap_table(base: str, steps: int, threads: int, lr_full: float, lr_lora: float) -> str:
    lines = ["| run | lr | held-out loss | gap to full | saved model.pt | peak RSS |", "|---|---|---|---|---|---|"]
    full = None
    for name in GAP_RUNS:
        options = RUNS[name]
        r = run_worker({"base": base, "options": options, "steps": steps, "threads": threads, "batch_size": 16,
                        "lr_full": lr_full, "lr_lora": lr_lora, "eval": True})
        full = r["val_loss"] if full is None else full
        lr = lr_lora if options.get("lora") else lr_full
        lines.append(f"| {name} | {lr:g} | {r['val_loss']:.4f} | {r['val_loss'] - full:+.4f} | "
                     f"{r['saved_bytes'] / 1e6:.2f} MB | {r['peak_rss_mb']:.0f} MB |")
        print(f"  {name}: {r}", file=sys.stderr, flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--base", default=str(ROOT / "results/pretrain/model.pt"),
                        help="pretrained checkpoint for the loss-gap runs")
    parser.add_argument("--steps", type=int, default=30, help="SFT steps of each peak-RSS run")
    parser.add_argument("--gap-steps", type=int, default=300, help="SFT steps of each loss-gap run (0: skip)")
    parser.add_argument("--lr-full", type=float, default=1e-3)
    # LoRA wants a larger lr than full fine-tuning; 1e-2 was the best of 2e-3 / 5e-3 / 1e-2 at 150 steps here.
    parser.add_argument("--lr-lora", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from lmforge.checkpoint import save_model
    from lmforge.loader import read_checkpoint
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import LMTokenizer

    print("## Weights\n\n" + weights_table(args.threads) + "\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # A CPU-small model with random weights and the base's tokenizer: what RSS needs.
        tok = LMTokenizer.from_str(read_checkpoint(args.base)["tokenizer"])
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_dict(cpu_small_config()))
        small = Path(tmp) / "cpu-small.pt"
        save_model(small, model, kind="causal_lm", model_config=model.cfg.to_dict(), tokenizer=tok, meta={})
        del model
        print(f"## Peak RSS of {args.steps} SFT steps (CPU-small model, batch 8 x 256, AdamW, "
              f"{args.threads} thread(s))\n\n" + rss_table(str(small), args.steps, args.threads) + "\n", flush=True)
    if args.gap_steps:
        base_cfg = read_checkpoint(args.base)["model_config"]
        print(f"## Held-out SFT loss after {args.gap_steps} steps from {Path(args.base).name} "
              f"(d {base_cfg['d_model']}, {base_cfg['n_layers']} layers, vocab {base_cfg['vocab_size']}, "
              f"batch 16 x {base_cfg['max_seq_len']})\n\n"
              + gap_table(args.base, args.gap_steps, args.threads, args.lr_full, args.lr_lora) + "\n", flush=True)


if __name__ == "__main__":
    main()
