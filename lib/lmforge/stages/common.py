"""What every training stage does the same way: set up the process, load the policy and prompts, log samples,
summarise the run, publish artifacts. Stages share code through this module (or lower layers), never
through each other."""
from __future__ import annotations

import sys

import torch

from lmforge import distributed as dist
from lmforge.checkpoint import save_model
from lmforge.data.formats import load_prompts
from lmforge.data.prompts import fitting_prompts
from lmforge.device import resolve_device, seed_everything, set_threads
from lmforge.errors import LmforgeError
from lmforge.estimate import summary
from lmforge.evaluate import greedy_responses
from lmforge.files import atomic_write_json, file_sha256
from lmforge.loader import load_model, save_adapter
from lmforge.lora import LoraConfig, apply_lora, has_adapters
from lmforge.train.loop import RESUME_FREE_KNOBS


def setup(env, seed: int) -> torch.device:
    """Threads, seeds and the device, in that order, before any model is built.

    Under torchrun also the process group (each process its share of the threads,
    its own GPU), and MLflow on rank 0 only: every rank seeds alike, so every rank
    builds the same model.
    """
    set_threads(dist.process_threads(env.threads))
    # Under Snakemake, OMP_NUM_THREADS (the rule's threads) decides this unless `threads` is set.
    env.tags = {**env.tags, "torch.threads": str(torch.get_num_threads())}
    seed_everything(seed)
    device = dist.init(resolve_device(env.device))
    if not dist.is_main():
        env.tracking_enabled = False  # one MLflow run per stage execution: rank 0's
    return device


def resume_fingerprint(params: dict, inputs: dict, **extra) -> dict:
    """What a stage's checkpoint must share with the current run to be resumed (``train``'s ``fingerprint``):
    the stage's whole params (every section, the seed and, under Snakemake, the code version) less the
    knobs that cannot change its result, the sha256 of every input file (name -> path, or a list of
    paths), and ``extra``, what the stage derives while it runs (a STaR round and its training set).
    The loop compares canonical forms: key order never matters."""
    def without_free_knobs(value):
        return {k: v for k, v in value.items() if k not in RESUME_FREE_KNOBS} if isinstance(value, dict) else value

    def digest(path):
        return [file_sha256(p) for p in path] if isinstance(path, (list, tuple)) else file_sha256(path)

    return {"params": {name: without_free_knobs(value) for name, value in params.items()},
            "inputs": {name: digest(path) for name, path in inputs.items() if path}, **extra}


def training_options(model, section: dict, key: str):
    """A stage section's model options on a freshly loaded Transformer, in place: ``lora`` (LoRA or
    QLoRA adapters; only they train afterwards), ``gradient_checkpointing`` and ``compile`` (the
    training forward through torch.compile). Returns the model."""
    if section.get("lora"):
        apply_lora(model, LoraConfig.from_dict(section["lora"], key=f"{key}.lora"), key=f"{key}.lora")
    model.gradient_checkpointing = bool(section.get("gradient_checkpointing", False))
    model.torch_compile = bool(section.get("compile", False))
    return model


def load_trainable(path, section: dict, key: str, device="cpu"):
    """``load_model(path)`` with the section's training options applied: (model, tokenizer, checkpoint)."""
    model, tok, ckpt = load_model(path, device=device)
    return training_options(model, section, key), tok, ckpt


N_SAMPLES = 5  # fixed held-out prompts whose greedy answers are logged at every evaluation


def sample_logger(run, tok, prompts: list):
    """An ``on_eval`` hook for the training loop: log the model's greedy answers to ``prompts`` to MLflow."""
    def log_samples(model: torch.nn.Module, step: int) -> None:
        with torch.no_grad():
            replies = greedy_responses(model, tok, prompts)
        run.log_text("\n\n".join(f"> {p}\n{r}" for p, r in zip(prompts, replies)), f"samples/step_{step:06d}.txt")

    return log_samples


def train_prompts(params: dict, inputs: dict, task_data: dict, stage: str) -> tuple[list[dict], str]:
    """(prompt records, where they came from) for ``<stage>.data``: a file, a hub spec, or the builtin RL split."""
    source = inputs.get("data") or params[stage]["data"]
    if source is None:
        return load_prompts(task_data["rl_train"], key=f"{stage}.data", name="builtin:rl_train"), "builtin:rl_train"
    return load_prompts(source, key=f"{stage}.data"), str(source)


def policy_and_prompts(stage: str, section: dict, inputs: dict, records: list[dict], source: str,
                       task_data: dict, device):
    """(policy, tokenizer, checkpoint, training prompts, held-out prompts, selection prompts) of an
    RL-on-prompts stage: the policy with the section's training options (lora, gradient_checkpointing,
    compile), and the prompts (rl_val and rl_dev for the last two) that leave room for a response."""
    model, tok, ckpt = load_trainable(inputs["policy"], section, stage, device)
    seq = ckpt["model_config"]["max_seq_len"]
    prompts = fitting_prompts(records, tok, seq)
    if not prompts:
        raise LmforgeError(f"{stage}.data: no prompt in {source} leaves room for a response within "
                           f"model.max_seq_len ({seq})")
    heldout, dev = (fitting_prompts(load_prompts(task_data[split], key=stage, name=f"builtin:{split}"), tok, seq)
                    for split in ("rl_val", "rl_dev"))
    return model, tok, ckpt, prompts, heldout, dev


def log_estimate(stage: str, model_config, section: dict, device, *, fused_loss: bool = True) -> None:
    """Print the model's size, training memory, FLOPs and expected time (``lmforge.estimate``) to stderr,
    the rule's log, as a stage starts; ``section`` is the stage's config section (batch, steps, optimizer).
    fused_loss=False for stages whose loss takes full (B, T, V) logits (all but pretraining)."""
    if not dist.is_main():
        return
    text = summary(model_config, section, stage=stage, device=device, fused_loss=fused_loss)
    print("\n".join(f"[{stage}] {line}" for line in text.splitlines()), file=sys.stderr, flush=True)


def run_summary(result, wall: float, device) -> dict:
    """The metrics.json fields every training stage reports about its loop."""
    tps = [h["mean_tokens_per_s"] for h in result.history if "mean_tokens_per_s" in h]
    return {"steps": result.step, "best_step": result.best_step, "stopped_early": result.stopped_early,
            "resumed_from": result.resumed_from, "wall_s": wall, "tokens_per_s": tps[-1] if tps else None,
            "device": str(device), "world_size": dist.world_size(), "history": [h for h in result.history if "val_loss" in h]}


def publish(run, env, params: dict, outputs: dict, model, *, kind: str, model_config: dict, tokenizer,
            stage: str, step: int, metrics: dict, final_metrics: dict, base: str | None = None) -> None:
    """Write model.pt and metrics.json atomically, then mirror them (and the config and log) to MLflow.

    A model with LoRA adapters is saved as an adapter checkpoint on ``base`` (the stage's input model file).
    """
    metrics["mlflow_run_id"] = run.run_id
    meta = {"stage": stage, "step": step, "mlflow_run_id": run.run_id}
    if has_adapters(model):
        save_adapter(outputs["model"], model, base=base, kind=kind, model_config=model_config, tokenizer=tokenizer,
                     meta=meta)
    else:
        save_model(outputs["model"], model, kind=kind, model_config=model_config, tokenizer=tokenizer, meta=meta)
    atomic_write_json(outputs["metrics"], metrics)
    run.log_metrics(final_metrics, step=step)
    run.log_dict(params, "config.json")
    run.log_artifact(outputs["metrics"])
    if env.log_path:
        run.log_artifact(env.log_path)
