"""The ``lmforge`` command: run a stage by hand, sample from any checkpoint, chat.

    lmforge run pretrain --config config/config.yaml     # one stage, without Snakemake
    lmforge generate results/pretrain/model.pt --prompt "What is 2 + 3?"
    lmforge chat results/pretrain/model.pt
"""
from __future__ import annotations

import argparse
import sys

from lmforge.errors import LmforgeError

# stage -> (config sections in its params, inputs, outputs); the same paths the Snakefile uses.
STAGES = {
    "tokenizer": (("tokenizer", "data"), {},
                  {"tokenizer": "results/tokenizer/tokenizer.json", "stats": "results/tokenizer/stats.json"}),
    "tokenize": (("data",), {"tokenizer": "results/tokenizer/tokenizer.json"},
                 {"train": "results/data/pretrain/train.bin", "val": "results/data/pretrain/val.bin",
                  "meta": "results/data/pretrain/meta.json"}),
    "pretrain": (("model", "pretrain"),
                 {"tokenizer": "results/tokenizer/tokenizer.json", "train": "results/data/pretrain/train.bin",
                  "val": "results/data/pretrain/val.bin", "meta": "results/data/pretrain/meta.json"},
                 {"model": "results/pretrain/model.pt", "metrics": "results/pretrain/metrics.json"}),
    # The data section travels whole here; the stages read only data.builtin from it.
    "sft": (("data", "sft"), {"model": "results/pretrain/model.pt"},
            {"model": "results/sft/model.pt", "metrics": "results/sft/metrics.json"}),
    "reward": (("data", "reward"), {"model": "results/sft/model.pt"},
               {"model": "results/reward/model.pt", "metrics": "results/reward/metrics.json"}),
    # Reference, data file, reward model and pairs are added per config (workflow.optional_inputs).
    "score": (("data", "score"), {"policy": "results/sft/model.pt"},
              {"samples": "results/scored/samples.parquet", "summary": "results/scored/summary.json",
               "pairs": "results/scored/pairs.jsonl"}),
    **{stage: (("data", stage), {"policy": "results/sft/model.pt"},
               {"model": f"results/{stage}/model.pt", "metrics": f"results/{stage}/metrics.json"})
       for stage in ("dpo", "ppo", "grpo")},
    "evaluate": (("data", "eval"),
                 {**{f"model_{s}": f"results/{s}/model.pt" for s in ("pretrain", "sft", "dpo", "ppo", "grpo")},
                  "reward_model": "results/reward/model.pt", "val": "results/data/pretrain/val.bin",
                  "meta": "results/data/pretrain/meta.json"},
                 {"metrics": "results/eval/metrics.csv", "summary": "results/eval/summary.json",
                  "report": "results/eval/report.md"}),
}


def cmd_run(args) -> None:
    import importlib

    from lmforge.config import load_config
    from lmforge.workflow import StageEnv, config_sections, optional_inputs

    config = load_config(args.config)
    sections, inputs, outputs = STAGES[args.stage]
    if args.stage in ("score", "dpo", "ppo", "grpo"):
        inputs = {**inputs, **optional_inputs(config, args.stage)}
    elif args.stage == "evaluate":  # only the stages the config lists
        inputs = {k: v for k, v in inputs.items()
                  if not k.startswith("model_") or k[len("model_"):] in config["eval"]["stages"]}
    params = config_sections(config)(*sections)
    env = StageEnv.from_config(args.stage, config)
    importlib.import_module(f"lmforge.stages.{args.stage}").run(params, inputs, outputs, env)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p)


def cmd_generate(args) -> None:
    import torch

    from lmforge.checkpoint import load_model
    from lmforge.generate import generate

    model, tok, _ = load_model(args.checkpoint)
    prompts = [tok.prompt_ids(p) if not args.raw else [tok.bos_id, *tok.encode(p)] for p in args.prompt]
    out = generate(model, prompts, stop_ids=(tok.end_id, tok.eos_id), pad_id=tok.pad_id,
                   generator=torch.Generator().manual_seed(args.seed), **_sampling(args))
    for p, ids in zip(args.prompt, out.tokens):
        print(f"> {p}\n{tok.decode(ids)}\n")


def cmd_chat(args) -> None:
    import torch

    from lmforge.checkpoint import load_model
    from lmforge.generate import stream

    model, tok, _ = load_model(args.checkpoint)
    gen = torch.Generator().manual_seed(args.seed)
    history: list[dict] = []
    print("lmforge chat: Ctrl-D or Ctrl-C to quit", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return
            history.append({"role": "user", "content": line})
            ids = tok.render_prompt(history)[-(model.cfg.max_seq_len - args.max_new_tokens):]
            print("model> ", end="", flush=True)
            reply: list[int] = []
            for t in stream(model, ids, stop_ids=(tok.end_id, tok.eos_id), generator=gen, **_sampling(args)):
                if t in (tok.end_id, tok.eos_id):
                    break
                reply.append(t)
                print(tok.decode([t]), end="", flush=True)
            print()
            history.append({"role": "assistant", "content": tok.decode(reply)})
    except KeyboardInterrupt:
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one stage without Snakemake")
    run.add_argument("stage", choices=sorted(STAGES))
    run.add_argument("--config", default="config/config.yaml")
    run.set_defaults(fn=cmd_run)
    for name, fn in (("generate", cmd_generate), ("chat", cmd_chat)):
        p = sub.add_parser(name, help=f"{name} with a checkpoint")
        p.add_argument("checkpoint")
        p.add_argument("--temperature", type=float, default=0.7)
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--seed", type=int, default=0)
        if name == "generate":
            p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
            p.add_argument("--raw", action="store_true", help="continue plain text instead of a chat prompt")
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
