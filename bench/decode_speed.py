"""Decoding tokens/s with the KV cache: lmforge's generate vs transformers' generate, same weights, same process.

    .venv/bin/python bench/decode_speed.py [--batch 1 16] [--prompt-len 32] [--new-tokens 128] [--repeats 5]
                                           [--compile] [--hf-compile] [--device cuda]

Greedy, a fixed number of new tokens (no stop token on either side), prompts of
equal length. The samplers take turns run by run so machine noise hits all
alike; tokens/s = batch * new tokens / wall time of the whole call (prefill
included), median over the repeats after one warm-up run each. Our weights are
copied into a LlamaForCausalLM (SDPA attention, its default dynamic cache), and
the greedy tokens of each are compared with transformers' as a check that they run the same model.

--compile adds "lmforge compiled" (``generate(..., compile=True)``); --hf-compile adds
"transformers compiled" (its static cache, ``cache_implementation="static"``, with the forward
through torch.compile). Their warm-up run compiles, and its time is reported as "first call":
a cold compile, as the bench points torch's compile cache (TORCHINDUCTOR_CACHE_DIR) at an
empty temporary folder unless that variable is set.
--device cuda runs both on the GPU (fp32 weights, as the stages sample), the GPU synchronised
before each call's clock stops (transformers' tokens are copied to the host, as ours are).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

from lmforge.generate import generate
from lmforge.model import ModelConfig, Transformer

try:
    from lmforge.hf import to_hf_state_dict
except ImportError:  # a checkout from before the export module (to time the old code)
    def to_hf_state_dict(model: Transformer) -> dict:
        """Llama's names are ours with ``model.`` before the trunk's."""
        return {(k if k.startswith("lm_head.") else "model." + k): v for k, v in model.state_dict().items()}

CFG = dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=688, max_seq_len=256,
           attention_type="gqa", tie_embeddings=True)


def hf_copy(model: Transformer):
    """A LlamaForCausalLM (SDPA attention) with our weights."""
    import transformers

    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head: tied
    hf.tie_weights()
    # No early stop: generation runs exactly max_new_tokens.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def run_ours(model, prompts: torch.Tensor, new: int, compile: bool = False) -> torch.Tensor:
    out = generate(model, prompts.tolist(), max_new_tokens=new, temperature=0, compile=compile)
    return torch.tensor(out.tokens)


@torch.no_grad()
def run_hf(hf, prompts: torch.Tensor, new: int, compile: bool = False) -> torch.Tensor:
    kw = {}
    if compile:
        from transformers import CompileConfig

        config = CompileConfig(mode="default", dynamic=False)  # "reduce-overhead" is CUDA graphs
        config._compile_all_devices = True  # transformers compiles on its own only on accelerators
        kw = dict(cache_implementation="static", compile_config=config)
    out = hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                      min_new_tokens=new, do_sample=False, **kw)
    return out[:, prompts.shape[1]:].cpu()  # ours returns host lists: both clocks stop with tokens on the host


def bench_batch(model, hf, batch: int, prompt_len: int, new: int, repeats: int, *, compile: bool = False,
                hf_compile: bool = False) -> dict:
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=g)
    hf_prompts = prompts.to(next(hf.parameters()).device)
    runners = {"lmforge": lambda: run_ours(model, prompts, new),
               "transformers": lambda: run_hf(hf, hf_prompts, new)}
    if compile:
        runners["lmforge compiled"] = lambda: run_ours(model, prompts, new, compile=True)
    if hf_compile:
        runners["transformers compiled"] = lambda: run_hf(hf, hf_prompts, new, compile=True)
    times = {k: [] for k in runners}
    first = {}
    tokens = {}
    for i in range(repeats + 1):
        for name, fn in runners.items():
            t = time.perf_counter()
            tokens[name] = fn()
            if i:  # the first run of each is warm-up (and, compiled, the compile)
                times[name].append(time.perf_counter() - t)
            else:
                first[name] = time.perf_counter() - t
    out = {name: {"tokens_per_s": batch * new / statistics.median(ts), "seconds": statistics.median(ts),
                  "runs_tokens_per_s": [batch * new / t for t in ts], "first_call_s": first[name],
                  "same_tokens": float((tokens[name] == tokens["transformers"]).float().mean())}
           for name, ts in times.items()}
    for name in runners:
        out[name]["vs_transformers"] = out[name]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    out["speedup"] = out["lmforge"]["vs_transformers"]
    out["same_tokens"] = out["lmforge"]["same_tokens"]
    return out


def cpu_pressure() -> str:
    """The "some" line of /proc/pressure/cpu (Linux): how long runnable tasks waited, a sign of other jobs."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().strip()
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time generate(..., compile=True)")
    ap.add_argument("--hf-compile", action="store_true",
                    help="also time transformers with its static cache and torch.compile")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if (args.compile or args.hf_compile) and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # cold compiles
        atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(CFG)).eval()
    hf = hf_copy(model)
    model, hf = model.to(args.device), hf.to(args.device)
    results = {"threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "device": args.device}
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{args.threads} threads"
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, {where}")
    results["cpu_pressure_before"] = cpu_pressure()
    print("cpu pressure before:", results["cpu_pressure_before"])
    for b in args.batch:
        r = bench_batch(model, hf, b, args.prompt_len, args.new_tokens, args.repeats, compile=args.compile,
                        hf_compile=args.hf_compile)
        results[f"batch_{b}"] = r
        for name, x in r.items():
            if isinstance(x, dict):
                print(f"batch {b:>3}: {name:<22} {x['tokens_per_s']:8.0f} tokens/s  {x['vs_transformers']:.2f}x  "
                      f"same tokens {x['same_tokens']:6.1%}  first call {x['first_call_s']:6.2f} s  runs "
                      + " ".join(f"{v:.0f}" for v in x["runs_tokens_per_s"]))
    results["cpu_pressure_after"] = cpu_pressure()
    print("cpu pressure after: ", results["cpu_pressure_after"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
