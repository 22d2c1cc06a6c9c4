"""What every training stage does the same way: set up the process, summarise the run, publish artifacts."""
from __future__ import annotations

import torch

from lmforge.checkpoint import atomic_write_json, save_model
from lmforge.device import resolve_device, seed_everything, set_threads


def setup(env, seed: int) -> torch.device:
    """Threads, seeds and the device, in that order, before any model is built."""
    set_threads(env.threads)
    seed_everything(seed)
    return resolve_device(env.device)


def run_summary(result, wall: float, device) -> dict:
    """The metrics.json fields every training stage reports about its loop."""
    tps = [h["mean_tokens_per_s"] for h in result.history if "mean_tokens_per_s" in h]
    return {"steps": result.step, "best_step": result.best_step, "stopped_early": result.stopped_early,
            "resumed_from": result.resumed_from, "wall_s": wall, "tokens_per_s": tps[-1] if tps else None,
            "device": str(device), "history": [h for h in result.history if "val_loss" in h]}


def publish(run, env, params: dict, outputs: dict, model, *, kind: str, model_config: dict, tokenizer,
            stage: str, step: int, metrics: dict, final_metrics: dict) -> None:
    """Write model.pt and metrics.json atomically, then mirror them (and the config and log) to MLflow."""
    metrics["mlflow_run_id"] = run.run_id
    save_model(outputs["model"], model, kind=kind, model_config=model_config, tokenizer=tokenizer,
               meta={"stage": stage, "step": step, "mlflow_run_id": run.run_id})
    atomic_write_json(outputs["metrics"], metrics)
    run.log_metrics(final_metrics, step=step)
    run.log_dict(params, "config.json")
    run.log_artifact(outputs["metrics"])
    if env.log_path:
        run.log_artifact(env.log_path)
