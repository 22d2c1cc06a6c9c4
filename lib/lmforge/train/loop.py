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

Resume never changes a result: ``last.pt`` is continued only when its fingerprint
(the stage's, see ``stages.common.resume_fingerprint``, plus every training knob
but ``RESUME_FREE_KNOBS``, and the model config) equals this run's, so a resumed
run ends with the weights an uninterrupted run of the current config would have.
Any other ``last.pt`` (other settings, unreadable, ``resume: false``) is moved to
``<ckpt_dir>/set-aside/`` with its ``best.pt``, never deleted, and training starts
fresh. Continuing a finished run on purpose takes ``resume_from``.

Under torchrun (``lmforge.distributed``) every rank runs this same loop on its
slice of each micro-batch; ``loss_fn`` may return ``metrics["loss_count"]``, the
number of items its mean is over, so the loss is the mean over every rank's
items. Rank 0 alone writes checkpoints.
"""
from __future__ import annotations

import hashlib
import json
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
from lmforge.files import file_sha256
from lmforge.train import optim as optim_lib

# The only knobs a checkpoint may disagree on and still be resumed automatically: none of them can
# change the trained weights or the published model (resume_optimizer only applies to resume_from).
RESUME_FREE_KNOBS = ("checkpoint_every", "log_every", "resume", "resume_from", "resume_optimizer")


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


class UnreadableCheckpoint(LmforgeError):
    pass


def canonical(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested dict as a flat ``{"a.b": JSON text}``: key order never matters, and two trees
    are equal exactly when their flat forms are, which can then be compared key by key."""
    flat = {}
    for key in sorted(tree, key=str):
        value = tree[key]
        if isinstance(value, dict) and value:
            flat.update(canonical(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value, sort_keys=True, default=str)
    return flat


def fingerprint_of(cfg: TrainConfig, model_config: dict, extra: dict, origin: dict | None = None) -> dict:
    """What a checkpoint must share with the current run to be resumed automatically: the stage's
    fingerprint (``extra``), every training knob that can change the result, the model config and,
    for a run started from ``resume_from``, that file's content. ``{"sha256", "summary"}``: the hash
    decides, the flat summary names what differs."""
    knobs = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE_KNOBS}
    summary = canonical({"loop": {"train": knobs, "model_config": model_config, "resume_from": origin}, **extra})
    digest = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "summary": summary}


def describe_changes(old: dict, new: dict, limit: int = 4) -> str:
    """What differs between two fingerprint summaries, e.g. ``max_steps 3000 → 12, input train 3f0c… → 9a1b…``."""
    def short(text: str) -> str:
        return text if len(text) <= 24 else text[:12] + "…"

    changes = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            name = f"input {key[len('inputs.'):]}" if key.startswith("inputs.") else key.rsplit(".", 1)[-1]
            text = f"{name} {short(old.get(key, 'unset'))} → {short(new.get(key, 'unset'))}"
            if text not in changes:  # a training knob shows both in the stage's params and the loop's knobs
                changes.append(text)
    return ", ".join(changes[:limit]) + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def read_state(path: Path) -> dict:
    """A checkpoint's contents; any failure to read it is an ``UnreadableCheckpoint`` naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a zip, unpickling errors, I/O errors: all mean unreadable
        raise UnreadableCheckpoint(f"{path} is unreadable ({type(e).__name__}: {str(e)[:200]})") from None


def set_aside(ckpt_dir: Path, stage: str, why: str) -> None:
    """Move last.pt and best.pt (whichever exist) into ``ckpt_dir/set-aside/``, kept, never deleted,
    and say in one line where they went and why. Rank 0 only."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for name in ("last", "best"):
        src = ckpt_dir / f"{name}.pt"
        if not src.exists():
            continue
        dest, n = ckpt_dir / "set-aside" / f"{name}-{stamp}.pt", 1
        while dest.exists():
            dest, n = ckpt_dir / "set-aside" / f"{name}-{stamp}-{n}.pt", n + 1
        dest.parent.mkdir(exist_ok=True)
        src.rename(dest)
        moved.append(str(dest))
    if moved:
        print(f"[{stage}] {why}; moved to {' and '.join(moved)}; training starts fresh", file=sys.stderr, flush=True)


def _decide_resume(cfg: TrainConfig, ckpt_dir: Path, fingerprint: dict, stage: str):
    """Rank 0's resume decision: (state of last.pt to continue or None, error message or None).
    Whatever is not continued is set aside."""
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    if not last_path.exists():
        set_aside(ckpt_dir, stage, f"{best_path} has no last.pt beside it")
        return None, None
    if not cfg.resume:
        set_aside(ckpt_dir, stage, f"not resuming {last_path}: '{stage}.resume' is false")
        return None, None
    try:
        state = read_state(last_path)
        theirs = state.get("fingerprint") if isinstance(state, dict) else None
        if not isinstance(theirs, dict) or "sha256" not in theirs:
            set_aside(ckpt_dir, stage, f"not resuming {last_path}: it has no fingerprint of this lmforge version")
            return None, None
        if theirs["sha256"] != fingerprint["sha256"]:
            changes = describe_changes(theirs.get("summary") or {}, fingerprint["summary"])
            set_aside(ckpt_dir, stage, f"not resuming {last_path}: its settings differ: {changes}")
            return None, None
        if state["best_step"] is not None:  # its best.pt is published at the end: it must be there and its own
            best_step = read_state(best_path)["step"] if best_path.exists() else None
            # (a best.pt newer than last.pt is rewritten identically as the steps after last.pt replay)
            if best_step != state["best_step"] and (best_step is None or best_step <= state["step"]):
                set_aside(ckpt_dir, stage, f"not resuming {last_path}: its best.pt (step {state['best_step']}) "
                                           f"is missing or replaced")
                return None, None
    except UnreadableCheckpoint as e:
        set_aside(ckpt_dir, stage, f"warning: {e}")
        return None, None
    try:
        dist.check_resume(state, last_path, stage)
    except LmforgeError as e:
        return None, str(e)
    return state, None


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


def _load_resume(path: Path, model, model_config: dict, stage: str, state: dict | None = None) -> dict:
    state = state if state is not None else read_state(path)
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
    src, origin = None, None
    if cfg.resume_from:
        src = Path(cfg.resume_from)
        if not src.exists():
            raise LmforgeError(f"config key '{stage}.resume_from': checkpoint not found: {src}")
        if src.resolve().parent == ckpt_dir.resolve():
            raise LmforgeError(f"config key '{stage}.resume_from': {src} is in {ckpt_dir}, which this run "
                               f"rewrites; copy it elsewhere and point '{stage}.resume_from' at the copy")
        # A run started from a file continues only from checkpoints of runs started from that same file.
        origin = {"sha256": file_sha256(src), "resume_optimizer": cfg.resume_optimizer}
    fingerprint = fingerprint_of(cfg, model_config, fingerprint, origin)
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
    # Rank 0 reads last.pt and decides; every rank follows the same decision.
    state, error = _decide_resume(cfg, ckpt_dir, fingerprint, stage) if dist.is_main() else (None, None)
    resumed, error = dist.broadcast((state is not None, error))
    if error:
        raise LmforgeError(error)
    step, best_val, best_step, bad_evals, history, resumed_from = 0, None, None, 0, [], None
    stopped_early = False
    good_checkpoint = None  # the checkpoint a NaN stop may point to: one this run resumed from or wrote
    if resumed:
        state = _load_resume(last_path, model, model_config, stage, state)
        good_checkpoint = last_path
    elif src is not None:
        state = read_state(src)
        if cfg.resume_optimizer:
            dist.check_resume(state, src, stage)
        state = _load_resume(src, model, model_config, stage, state)
        if state["step"] > cfg.max_steps:
            raise LmforgeError(f"{stage}: {src} is at step {state['step']}, past '{stage}.max_steps' "
                               f"({cfg.max_steps}); raise max_steps to continue it")
        good_checkpoint = src
    if state is not None:
        if resumed or cfg.resume_optimizer:  # an automatic resume always continues the optimizer
            if state.get("optimizer_name") != cfg.optimizer:
                raise LmforgeError(
                    f"{stage}: the checkpoint was trained with optimizer '{state.get('optimizer_name')}', "
                    f"not '{cfg.optimizer}'; set '{stage}.resume_optimizer: false' to start a fresh optimizer")
            dist.load_optimizer_state(model, optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        else:  # a fresh schedule continues from the resumed step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # stepping the schedule before any optimizer step
                for _ in range(state["step"]):
                    scheduler.step()
        step, history = state["step"], state["history"]
        set_rng_state(state["rng_ranks"][dist.rank()] if state.get("rng_ranks") else state["rng"])
        if resumed:  # the interrupted run, exactly where it stopped
            best_val, best_step, bad_evals = state["best_val"], state["best_step"], state["bad_evals"]
            stopped_early = state.get("stopped_early", False)
            print(f"[{stage}] resumed {last_path} at step {step}", file=sys.stderr)
        else:  # the best checkpoint is picked among this run's own evaluations
            print(f"[{stage}] continuing {src} from step {step} (resume_from)", file=sys.stderr)
        resumed_from = step
    saved_step = step if resumed else None

    def save_last() -> None:
        # Every rank takes part (FSDP gathers the shards, the random states are gathered); rank 0 writes.
        nonlocal good_checkpoint, saved_step
        state = {"model": dist.model_state(model), "optimizer": dist.optimizer_state(model, optimizer),
                 "rng": rng_state()}
        rng_ranks = dist.rng_states(state["rng"])
        if dist.is_main():
            atomic_torch_save({
                "fingerprint": fingerprint, "model_config": model_config, "step": step, **state,
                "optimizer_name": cfg.optimizer, "scheduler": scheduler.state_dict(), "rng_ranks": rng_ranks,
                **dist.topology(), "best_val": best_val, "best_step": best_step, "bad_evals": bad_evals,
                "history": history, "stopped_early": stopped_early,
            }, last_path)
        good_checkpoint, saved_step = last_path, step

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
    window_tokens, window_time = 0, 0.0
    try:
        while step < cfg.max_steps and not stopped_early:
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
                        f"The last good checkpoint is intact: {good_checkpoint or 'none yet'}")
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
                    f"The last good checkpoint is intact: {good_checkpoint or 'none yet'}")
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
    if saved_step != step:  # the loop had nothing to do (max_steps 0, or resume_from at max_steps)
        save_last()
    if window_time:
        history.append({"step": step, "mean_tokens_per_s": window_tokens / window_time})
    return TrainResult(step=step, best_val=best_val, best_step=best_step, last_path=last_path,
                       best_path=best_path if best_path.exists() else None, stopped_early=stopped_early,
                       history=history, resumed_from=resumed_from)


def final_weights(result: TrainResult, cfg: TrainConfig) -> dict:
    """The state dict a stage publishes: best-by-val when save_best_only, else the last step's."""
    src = result.best_path if (cfg.save_best_only and result.best_path) else result.last_path
    return read_state(src)["model"]
