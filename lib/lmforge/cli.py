"""The ``lmforge`` command: run a stage by hand, sample from any checkpoint, chat.

    lmforge run pretrain --config config/config.yaml     # one stage, without Snakemake
    lmforge generate results/pretrain/model.pt --prompt "What is 2 + 3?"
    lmforge chat results/pretrain/model.pt
    lmforge inspect config/config.yaml                   # parameters, memory, FLOPs, expected time
    lmforge merge results/sft/model.pt sft-merged.pt          # fold LoRA adapters into a full checkpoint
    lmforge export results/dpo/model.pt hf/dpo                # a folder transformers loads
"""
from __future__ import annotations

import argparse
import signal
import sys

from lmforge.errors import LmforgeError
from lmforge.pipeline import STAGES, process_settings, stage_inputs, stage_outputs, stage_params

# The commands import torch (through the stages and models) only when they run: `lmforge --help` is instant.


def cmd_run(args) -> None:
    from lmforge.config import load_config
    from lmforge.workflow import StageEnv, launch

    # The stage's params, inputs and outputs exactly as its Snakemake rule has them (lmforge.pipeline).
    config = load_config(args.config)
    env = StageEnv.from_config(args.stage, config)
    # In this process, or under torchrun when the config asks a training stage for several processes.
    launch(args.stage, stage_params(args.stage, config), stage_inputs(args.stage, config),
           stage_outputs(args.stage), env, **process_settings(config, args.stage))


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p)


def cmd_generate(args) -> None:
    import torch

    from lmforge.generate import generate
    from lmforge.loader import load_model

    model, tok, _ = load_model(args.checkpoint)
    prompts = [tok.prompt_ids(p) if not args.raw else [tok.bos_id, *tok.encode(p)] for p in args.prompt]
    out = generate(model, prompts, stop_ids=(tok.end_id, tok.eos_id), pad_id=tok.pad_id,
                   generator=torch.Generator().manual_seed(args.seed), compile=args.compile, **_sampling(args))
    for p, ids in zip(args.prompt, out.tokens):
        print(f"> {p}\n{tok.decode(ids)}\n")


def _chat_prompt(tok, history: list[dict], max_seq_len: int, max_new_tokens: int) -> list[int]:
    """Prompt ids of the conversation so far, leaving room for a reply.

    The reply gets max_new_tokens but at most half the context; the oldest exchanges are
    dropped until the rest fits, and a single message too long even then keeps its last tokens.
    """
    room = max_seq_len - min(max_new_tokens, max_seq_len // 2)
    while len(history) > 1 and len(tok.render_prompt(history)) > room:
        history = history[2:]  # the oldest user turn and its answer
    return tok.render_prompt(history)[-room:]


def cmd_chat(args) -> None:
    import torch

    from lmforge.generate import stream
    from lmforge.loader import load_model

    # A process started in the background of a non-interactive shell (make, CI, nohup) inherits
    # SIGINT ignored, and Python then never raises KeyboardInterrupt: Ctrl-C must always quit a chat.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        model, tok, _ = load_model(args.checkpoint)
        gen = torch.Generator().manual_seed(args.seed)
        stops = (tok.end_id, tok.eos_id)
        history: list[dict] = []
        print("lmforge chat: Ctrl-D or Ctrl-C to quit", file=sys.stderr)
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return
            history.append({"role": "user", "content": line})
            ids = _chat_prompt(tok, history, model.cfg.max_seq_len, args.max_new_tokens)
            print("model> ", end="", flush=True)
            reply, shown = [], ""
            for t in stream(model, ids, stop_ids=stops, generator=gen, **_sampling(args)):
                if t in stops:
                    break
                reply.append(t)
                text = tok.decode(reply)
                if not text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest of it
                    print(text[len(shown):], end="", flush=True)
                    shown = text
            text = tok.decode(reply)
            print(text[len(shown):])
            history.append({"role": "assistant", "content": text})
    except KeyboardInterrupt:  # Ctrl-C while typing, loading or answering: a clean exit
        print()


def cmd_export(args) -> None:
    from lmforge.loader import export

    out = export(args.checkpoint, args.out_dir, dtype=args.dtype)
    print(f"exported {args.checkpoint} to {out} (transformers: AutoModelForCausalLM.from_pretrained('{out}'))")


def cmd_merge(args) -> None:
    from lmforge.loader import merge_checkpoint

    meta = merge_checkpoint(args.adapter, args.out, base=args.base)
    print(f"merged {args.adapter} into its base {meta['base']}: {args.out}")


def cmd_inspect(args) -> None:
    from lmforge.estimate import describe

    print(describe(args.path, device=args.device))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one stage without Snakemake")
    run.add_argument("stage", choices=list(STAGES))
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
            p.add_argument("--compile", action="store_true",
                           help="decode through torch.compile: a one-off compile of several seconds, worth it "
                                "for thousands of tokens (same tokens as without)")
        p.set_defaults(fn=fn)
    export = sub.add_parser("export", help="write a checkpoint as a Hugging Face transformers folder")
    export.add_argument("checkpoint")
    export.add_argument("out_dir")
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    export.set_defaults(fn=cmd_export)
    merge = sub.add_parser("merge", help="fold a LoRA adapter checkpoint into a full model checkpoint")
    merge.add_argument("adapter", help="a LoRA stage's model.pt (kind: lora)")
    merge.add_argument("out", help="where to write the merged checkpoint")
    merge.add_argument("--base", help="the base checkpoint, if not at the path the adapters record")
    merge.set_defaults(fn=cmd_merge)
    inspect = sub.add_parser("inspect",
                             help="parameters, memory, FLOPs and training time of a config or checkpoint")
    inspect.add_argument("path", help="a config (.yaml: its model and pretrain sections) or a model checkpoint")
    inspect.add_argument("--device", help="time training on this device (default: the config's, else auto)")
    inspect.set_defaults(fn=cmd_inspect)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
