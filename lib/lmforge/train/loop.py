"""The one training loop every gradient-based stage reuses.

A stage supplies three functions and the loop does the rest:

* ``batch_fn(step, micro) -> batch``: the micro-batch for an optimizer step. It
  must be a pure function of (step, micro) — that is what makes a resumed run
  see exactly the data the uninterrupted run would have seen.
* ``loss_fn(model, batch) -> (loss, metrics)``: a scalar loss; ``metrics`` may
  carry ``"tokens"`` (for tokens/s) and any float the stage wants logged.
* ``eval_fn(model) -> metrics``: held-out metrics; ``val_loss`` picks the best.

Optimizer, schedule with warmup, gradient accumulation and clipping, periodic
evaluation, early stopping, atomic best/last checkpoints, exact resume (model,
optimizer, scheduler, step, RNG), and a NaN guard that stops with the last good
checkpoint intact all live here, once.

Under torchrun (``lmforge.distributed``) every rank runs this same loop on its
slice of each micro-batch; ``loss_fn`` may return ``metrics["loss_count"]``, the
number of items its mean is over, so the loss is the mean over every rank's
items. Rank 0 alone writes checkpoints.
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge import distributed as dist
from lmforge.checkpoint import atomic_torch_save
from lmforge.config import TrainConfig
from lmforge.device import autocast, rng_state, set_rng_state
from lmforge.errors import LmforgeError
from lmforge.train import optim as optim_lib

# Knobs that may change between a run and its resume without invalidating the checkpoint.
RESUMABLE_CHANGES = ("max_steps", "eval_every", "eval_steps", "patience", "save_best_only",
                     "checkpoint_every", "log_every", "resume", "resume_from", "resume_optimizer")


@dataclass
class TrainResult:
    step: int
    best_val: float | None
    best_step: int | None
    last_path: Path
    best_path: Path | None
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None


def fingerprint_of(cfg: TrainConfig, extra: dict) -> dict:
    """What a checkpoint must share with the current run to be resumed automatically."""
    knobs = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    return {"train": knobs, **extra}


class Log:
    """Plain log lines for rule logs; a tqdm bar when a person watches a terminal."""

    def __init__(self, stage: str, total: int, start: int):
        self.stage = stage
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, dynamic_ncols=True)

    def step(self, step: int, metrics: dict, every: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 tok_s=f"{metrics.get('tokens_per_s', 0):.0f}")
        elif step % every == 0:
            self.line(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"[{self.stage}] {text}")
        else:
            print(f"[{self.stage}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _load_resume(path: Path, model, model_config: dict, stage: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    theirs = state.get("model_config")
    if theirs != model_config:
        diff = sorted(k for k in set(theirs or {}) | set(model_config)
                      if (theirs or {}).get(k) != model_config.get(k))
        detail = ", ".join(f"{k}: {(theirs or {}).get(k)!r} in checkpoint vs {model_config.get(k)!r} now"
                           for k in diff[:6])
        raise LmforgeError(f"{stage}: cannot resume from {path}: it was trained with a different model config ({detail})")
    dist.load_model_state(model, state["model"])
    return state


def train(model: torch.nn.Module, *, stage: str, cfg: TrainConfig, model_config: dict,
          batch_fn: Callable[[int, int], Any], loss_fn: Callable[[torch.nn.Module, Any], tuple],
          eval_fn: Callable[[torch.nn.Module], dict] | None, ckpt_dir: str | Path, device: torch.device,
          fingerprint: dict, run=None, params: list | None = None,
          on_eval: Callable[[torch.nn.Module, int], None] | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps. See the module docstring."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    fingerprint = fingerprint_of(cfg, fingerprint)
    dist.check_batch(cfg.batch_size, f"{stage}.batch_size")
    dist.check_optimizer(cfg.optimizer, f"{stage}.optimizer")
    train_model = dist.wrap(model, device)  # what loss_fn calls; FSDP shards model in place, so before the optimizer

    optimizer = optim_lib.build_optimizer(
        model, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
        betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, key=f"{stage}.optimizer", params=params)
    scheduler = optim_lib.build_scheduler(
        optimizer, name=cfg.scheduler, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
        min_lr_ratio=cfg.min_lr_ratio, power=cfg.lr_power, key=f"{stage}.scheduler")

    # ---- resume ------------------------------------------------------------------
    step, best_val, best_step, bad_evals, history, resumed_from = 0, None, None, 0, [], None
    state = None
    log = None
    if cfg.resume_from:
        src = Path(cfg.resume_from)
        if not src.exists():
            raise LmforgeError(f"config key '{stage}.resume_from': checkpoint not found: {src}")
        if cfg.resume_optimizer:
            dist.check_resume(torch.load(src, map_location="cpu", weights_only=False), src, stage)
        state = _load_resume(src, model, model_config, stage)
    elif cfg.resume and last_path.exists():
        candidate = torch.load(last_path, map_location="cpu", weights_only=False)
        if candidate.get("fingerprint") == fingerprint:
            dist.check_resume(candidate, last_path, stage)
            state = _load_resume(last_path, model, model_config, stage)
        else:
            print(f"[{stage}] ignoring {last_path}: it belongs to a run with other settings", file=sys.stderr)
    if state is not None:
        if cfg.resume_optimizer:
            if state.get("optimizer_name") != cfg.optimizer:
                raise LmforgeError(
                    f"{stage}: the checkpoint was trained with optimizer '{state.get('optimizer_name')}', "
                    f"not '{cfg.optimizer}'; set '{stage}.resume_optimizer: false' to start a fresh optimizer")
            dist.load_optimizer_state(model, optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        step, best_val, best_step = state["step"], state["best_val"], state["best_step"]
        bad_evals, history = state["bad_evals"], state["history"]
        set_rng_state(state["rng_ranks"][dist.rank()] if state.get("rng_ranks") else state["rng"])
        if not cfg.resume_optimizer:  # a fresh schedule continues from the resumed step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # stepping the schedule before any optimizer step
                for _ in range(step):
                    scheduler.step()
        resumed_from = step
        print(f"[{stage}] resumed at step {step}", file=sys.stderr)
    elif dist.is_main():
        best_path.unlink(missing_ok=True)  # a best.pt from another run must not be published as ours

    def save_last() -> None:
        # Every rank takes part (FSDP gathers the shards, the random states are gathered); rank 0 writes.
        state = {"model": dist.model_state(model), "optimizer": dist.optimizer_state(model, optimizer),
                 "rng": rng_state()}
        rng_ranks = dist.rng_states(state["rng"])
        if dist.is_main():
            atomic_torch_save({
                "fingerprint": fingerprint, "model_config": model_config, "step": step, **state,
                "optimizer_name": cfg.optimizer, "scheduler": scheduler.state_dict(), "rng_ranks": rng_ranks,
                **dist.topology(), "best_val": best_val, "best_step": best_step, "bad_evals": bad_evals,
                "history": history,
            }, last_path)

    def evaluate() -> dict:
        nonlocal best_val, best_step, bad_evals
        model.eval()
        with torch.no_grad(), autocast(device):
            metrics = dist.broadcast(eval_fn(model))  # every rank evaluates; rank 0's numbers decide
        model.train()
        val = metrics.get("val_loss")
        improved = val is not None and (best_val is None or val < best_val)
        if improved:
            best_val, best_step, bad_evals = val, step, 0
            weights = dist.model_state(model)
            if dist.is_main():
                atomic_torch_save({"model": weights, "step": step, "val_loss": val}, best_path)
        elif val is not None:
            bad_evals += 1
        history.append({"step": step, **metrics})
        if run is not None:
            run.log_metrics(metrics, step)
        if on_eval is not None and dist.is_main() and dist.strategy() != "fsdp":  # logging only: rank 0
            on_eval(model, step)
        log.line(f"eval at step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    # ---- loop --------------------------------------------------------------------
    model.train()
    log = Log(stage, cfg.max_steps, step)
    stopped_early = False
    window_tokens, window_time = 0, 0.0
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            totals: dict[str, float] = {}
            for micro in range(cfg.grad_accum_steps):
                batch = dist.shard(batch_fn(step, micro), f"{stage}.batch_size")
                dist.set_grad_sync(train_model, micro == cfg.grad_accum_steps - 1)
                with autocast(device), optim_lib.forward_context(optimizer):
                    loss, metrics = loss_fn(train_model, batch)
                loss = dist.global_mean(loss, metrics.pop("loss_count", None))
                # Several ranks: a non-finite loss shows in every rank's (reduced) gradient norm below.
                if dist.world_size() == 1 and not torch.isfinite(loss):
                    raise LmforgeError(
                        f"{stage}: non-finite loss ({loss.item()}) at step {step + 1}; stopped. "
                        f"The last good checkpoint is intact: {last_path if last_path.exists() else 'none yet'}")
                optim_lib.backward(loss / cfg.grad_accum_steps, optimizer)
                totals["loss"] = totals.get("loss", 0.0) + loss.item() / cfg.grad_accum_steps
                for k, v in metrics.items():
                    scale = 1 if k == "tokens" else 1 / cfg.grad_accum_steps
                    totals[k] = totals.get(k, 0.0) + float(v) * scale
            totals = dist.reduce_metrics(totals)
            grad_norm = dist.item(torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.grad is not None],
                cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
            if not torch.isfinite(grad_norm):
                raise LmforgeError(
                    f"{stage}: non-finite gradient norm at step {step + 1}; stopped. "
                    f"The last good checkpoint is intact: {last_path if last_path.exists() else 'none yet'}")
            lr = optimizer.param_groups[0]["lr"]
            optim_lib.optimizer_step(optimizer)
            scheduler.step()
            step += 1

            dt = time.perf_counter() - t0
            tokens = totals.pop("tokens", 0.0)
            window_tokens, window_time = window_tokens + tokens, window_time + dt
            metrics = {**totals, "lr": lr, "grad_norm": grad_norm.item()}
            if tokens:
                metrics["tokens_per_s"] = tokens / dt
            if run is not None:
                run.log_metrics(metrics, step)
            log.step(step, metrics, cfg.log_every)

            last_step = step == cfg.max_steps
            if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last_step):
                evaluate()
                if cfg.patience and bad_evals >= cfg.patience:
                    log.line(f"early stop at step {step}: no val improvement in {bad_evals} evals")
                    stopped_early = True
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last_step or stopped_early:
                save_last()
            if stopped_early:
                break
    finally:
        log.close()
    if window_time:
        history.append({"step": step, "mean_tokens_per_s": window_tokens / window_time})
    return TrainResult(step=step, best_val=best_val, best_step=best_step, last_path=last_path,
                       best_path=best_path if best_path.exists() else None, stopped_early=stopped_early,
                       history=history, resumed_from=resumed_from)


def final_weights(result: TrainResult, cfg: TrainConfig) -> dict:
    """The state dict a stage publishes: best-by-val when save_best_only, else the last step's."""
    src = result.best_path if (cfg.save_best_only and result.best_path) else result.last_path
    return torch.load(src, map_location="cpu", weights_only=False)["model"]
