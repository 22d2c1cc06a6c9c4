"""Decoding tokens/s with the KV cache: lmforge's generate vs transformers' generate, same weights, same process.

    .venv/bin/python bench/decode_speed.py [--batch 1 16] [--prompt-len 32] [--new-tokens 128] [--repeats 5]

Greedy, a fixed number of new tokens (no stop token on either side), prompts of
equal length. The two samplers take turns run by run so machine noise hits both
alike; tokens/s = batch * new tokens / wall time of the whole call (prefill
included), median over the repeats after one warm-up run each. Our weights are
copied into a LlamaForCausalLM (SDPA attention, its default dynamic cache), and
the greedy tokens of both are compared as a check that they run the same model.
"""
from __future__ import annotations

import argparse
import json
import statistics
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


def run_ours(model, prompts: torch.Tensor, new: int) -> torch.Tensor:
    out = generate(model, prompts.tolist(), max_new_tokens=new, temperature=0)
    return torch.tensor(out.tokens)


@torch.no_grad()
def run_hf(hf, prompts: torch.Tensor, new: int) -> torch.Tensor:
    out = hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                      min_new_tokens=new, do_sample=False)
    return out[:, prompts.shape[1]:]


def bench_batch(model, hf, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=g)
    runners = {"lmforge": lambda: run_ours(model, prompts, new), "transformers": lambda: run_hf(hf, prompts, new)}
    times = {k: [] for k in runners}
    tokens = {}
    for i in range(repeats + 1):
        for name, fn in runners.items():
            t = time.perf_counter()
            tokens[name] = fn()
            if i:  # the first run of each is warm-up
                times[name].append(time.perf_counter() - t)
    out = {name: {"tokens_per_s": batch * new / statistics.median(ts), "seconds": statistics.median(ts)}
           for name, ts in times.items()}
    out["speedup"] = out["lmforge"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    out["same_tokens"] = float((tokens["lmforge"] == tokens["transformers"]).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(CFG)).eval()
    hf = hf_copy(model)
    results = {"threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, {args.threads} threads")
    for b in args.batch:
        r = bench_batch(model, hf, b, args.prompt_len, args.new_tokens, args.repeats)
        results[f"batch_{b}"] = r
        print(f"batch {b:>3}: lmforge {r['lmforge']['tokens_per_s']:8.0f} tokens/s   transformers "
              f"{r['transformers']['tokens_per_s']:8.0f} tokens/s   speedup {r['speedup']:.2f}x   "
              f"same tokens {r['same_tokens']:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
