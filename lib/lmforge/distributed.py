"""Multi-process data-parallel training: the process group, data shards, the model wrapper, the launch.

A training rule that asks for N > 1 processes (``distributed.nproc``, else its
``resources.<rule>.gpu``) re-runs its stage function under ``torchrun
--standalone --nproc_per_node N`` (:func:`launch`). Every process builds the
same model from the same seed and walks the same training loop; the loop asks
this module for the rest:

* :func:`init` joins the process group torchrun describes: gloo on CPU, nccl
  on CUDA (one GPU per process, ``cuda:LOCAL_RANK``).
* :func:`shard` gives each rank a disjoint slice of every micro-batch, so the
  global batch (``batch_size * grad_accum_steps``) is the one a single process
  sees and the per-rank micro-batch is ``batch_size / world_size``.
* :func:`wrap` makes the model data parallel: DDP (a full replica per rank,
  gradients all-reduced) or FSDP2 (``fully_shard``: parameters, gradients and
  optimizer state sharded across ranks).
* :func:`global_mean` and :func:`reduce_metrics` make the loss and the logged
  numbers those of the whole micro-batch, as one process would compute them.

Rank 0 alone writes: checkpoints, MLflow, metrics and model files. Every rank
runs the periodic evaluation on the full held-out set (the replicas are equal,
and an FSDP forward needs every rank anyway) and rank 0's numbers are
broadcast, so early stopping and best-checkpoint decisions agree everywhere.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import LmforgeError

STRATEGIES = ("ddp", "fsdp")
FSDP_OPTIMIZERS = ("adamw",)  # elementwise updates: correct on parameter shards

_strategy = "ddp"  # set by the torchrun worker (configure) before the stage runs
_comm_device = torch.device("cpu")  # where collective tensors live: cuda:LOCAL_RANK under nccl


# --------------------------------------------------------------------------- ranks


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on the one process that writes (rank 0; the only process of a plain run)."""
    return rank() == 0


def local_world_size() -> int:
    """Processes on this machine, from torchrun's environment (1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def configure(strategy: str = "ddp") -> None:
    """Choose how :func:`wrap` makes the model parallel in this process: ``ddp`` or ``fsdp``."""
    global _strategy
    if strategy not in STRATEGIES:
        raise LmforgeError(f"config key 'distributed.strategy': {strategy!r} is not one of {', '.join(STRATEGIES)}")
    _strategy = strategy


def strategy() -> str | None:
    """``ddp`` or ``fsdp`` in a multi-process run, None in a single process."""
    return _strategy if world_size() > 1 else None


def process_threads(threads: int | None) -> int | None:
    """Torch threads of one process: the configured ``threads`` (null: every core) split between
    the processes on this machine, so N processes do not oversubscribe the cores one would use."""
    n = local_world_size()
    if n <= 1:
        return threads
    return max(1, (threads or os.cpu_count() or 1) // n)


def init(device: torch.device) -> torch.device:
    """Join the process group described by torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Returns this process's device: ``cuda:LOCAL_RANK`` on CUDA, else ``device``.
    Outside torchrun (WORLD_SIZE unset or 1) nothing happens.
    """
    global _comm_device
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(shutdown)
    _comm_device = device if device.type == "cuda" else torch.device("cpu")
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- data


def check_batch(rows: int, key: str) -> None:
    """Raise unless ``rows`` (a micro-batch, config key ``key``) splits evenly across the processes."""
    w = world_size()
    if rows % w:
        raise LmforgeError(
            f"config key '{key}' ({rows}) is not divisible by the number of processes ({w}, distributed.nproc): "
            f"each process trains on an equal slice of every micro-batch; set '{key}' to a multiple of {w} "
            f"or change distributed.nproc")


def shard(batch, key: str = "batch_size"):
    """This rank's slice of a micro-batch: rows ``[rank * B/W, (rank + 1) * B/W)``.

    ``batch`` is any nesting of dicts, tuples, lists and dataclasses. B is the
    smallest leading dimension among its tensors; a tensor of k*B rows is read
    as k stacked blocks of B rows (DPO's chosen rows, then rejected rows) and
    sliced block by block. Other tensors and plain numbers describe the whole
    micro-batch and are kept as they are.
    """
    w = world_size()
    if w == 1:
        return batch
    sizes = [t.shape[0] for t in _tensors(batch) if t.dim() > 0]
    if not sizes:
        return batch
    rows = min(sizes)
    check_batch(rows, key)
    per = rows // w
    return _slice(batch, rows, rank() * per, per)


def _tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            yield from _tensors(getattr(x, f.name))


def _slice(x, rows: int, start: int, per: int):
    if torch.is_tensor(x):
        if x.dim() == 0 or x.shape[0] % rows:
            return x
        blocks = x.shape[0] // rows
        return torch.cat([x[b * rows + start: b * rows + start + per] for b in range(blocks)])
    if isinstance(x, dict):
        return {k: _slice(v, rows, start, per) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
        return type(x)(*(_slice(v, rows, start, per) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_slice(v, rows, start, per) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _slice(getattr(x, f.name), rows, start, per)
                                         for f in dataclasses.fields(x) if f.init})
    return x


# --------------------------------------------------------------------------- numbers


def global_mean(loss: torch.Tensor, count) -> torch.Tensor:
    """This rank's share of the mean over every rank's items.

    ``loss`` is a mean over ``count`` items (trained tokens, say) of this rank's
    slice. Returns ``loss * count * W / total``: the gradient average DDP and
    FSDP take over ranks is then the gradient of the mean over all ``total``
    items, exactly what one process computes on the whole micro-batch. With
    ``count`` None (equal items per rank) the loss is returned unchanged.
    """
    w = world_size()
    if count is None or w == 1:
        return loss
    total = torch.tensor(float(count), dtype=torch.float64, device=_comm_device)
    dist.all_reduce(total)
    return loss * (float(count) * w / max(total.item(), 1.0))


def reduce_metrics(totals: dict[str, float]) -> dict[str, float]:
    """Step metrics over every rank: ``tokens`` summed, every other number averaged."""
    w = world_size()
    if w == 1 or not totals:
        return totals
    keys = sorted(totals)
    t = torch.tensor([float(totals[k]) for k in keys], dtype=torch.float64, device=_comm_device)
    dist.all_reduce(t)
    return {k: v if k == "tokens" else v / w for k, v in zip(keys, t.tolist())}


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device)
    return box[0]


def item(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of an FSDP DTensor result (a gradient norm), else ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# --------------------------------------------------------------------------- model


class _Methods(nn.Module):
    """Lets one DDP forward run any method of the model: DDP arms its gradient hooks in its own
    forward, so ``hidden_states`` must go through it as well as ``forward``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, _method: str = "forward", **kwargs):
        return getattr(self.model, _method)(*args, **kwargs)


class DataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP that a loss function can use like the model: ``model(x)``, ``model.hidden_states(x)``
    (both through DDP's forward), and every other attribute of the model (``lm_head``, ``cfg``)."""

    FORWARD_METHODS = ("hidden_states",)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = super().__getattr__("module").model
            if name in self.FORWARD_METHODS and hasattr(inner, name):
                return functools.partial(self, _method=name)
            return getattr(inner, name)


def check_optimizer(optimizer: str, key: str) -> None:
    """Refuse optimizers that are wrong in a multi-process run of this strategy."""
    if world_size() == 1:
        return
    if optimizer == "sophia":
        raise LmforgeError(f"config key '{key}': sophia needs the graph of the gradients (a double backward), "
                           f"which data-parallel training does not support; use distributed.nproc: 1")
    if _strategy == "fsdp" and optimizer not in FSDP_OPTIMIZERS:
        raise LmforgeError(f"config key '{key}': {optimizer} is not supported with distributed.strategy: fsdp "
                           f"(its update needs whole matrices, FSDP keeps shards); use "
                           f"{' or '.join(FSDP_OPTIMIZERS)}, or distributed.strategy: ddp")


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module a loss function should call in this process.

    Single process: ``model``. DDP: a :class:`DataParallel` around it (``model``
    itself stays the plain module, with unprefixed state-dict keys). FSDP:
    ``model`` itself, sharded in place (each ``model.layers[i]`` and the root),
    so build the optimizer after this call. Ranks other than 0 then fork their
    own random stream (dropout masks must differ between the slices).
    """
    if world_size() == 1:
        return model
    if _strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for layer in getattr(model, "layers", []):
            fully_shard(layer)
        fully_shard(model)
        if hasattr(model, "hidden_states"):
            register_fsdp_forward_method(model, "hidden_states")
        wrapped = model
    else:
        # Buffers are a pure function of the config: no need to broadcast them at every forward.
        wrapped = DataParallel(_Methods(model), device_ids=[device.index] if device.type == "cuda" else None,
                               forward_sync_buffers=False)
    if rank() > 0:
        torch.manual_seed(torch.initial_seed() + rank())
    return wrapped


def set_grad_sync(wrapped: nn.Module, sync: bool) -> None:
    """Whether the next backward reduces gradients across ranks (only the last micro-batch of a step needs to)."""
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        wrapped.require_backward_grad_sync = sync
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # an FSDP2 module
        wrapped.set_requires_gradient_sync(sync)


def _fsdp(model: nn.Module) -> bool:
    return world_size() > 1 and hasattr(model, "set_requires_gradient_sync")


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state(model: nn.Module) -> dict:
    """The full state dict (FSDP: gathered, collective; complete on rank 0 only)."""
    if not _fsdp(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def load_model_state(model: nn.Module, state: dict) -> None:
    """Load a full state dict (every rank passes the whole dict)."""
    if not _fsdp(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_options())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state dict (FSDP: gathered and keyed by parameter name, collective)."""
    if not _fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if not _fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_full_options())


def unwrap(model: nn.Module, build) -> nn.Module:
    """A plain module for rank 0's work after training: ``model`` itself, or for FSDP
    (whose parameters stay sharded) a fresh one from ``build()``; load the final weights into it."""
    return build() if _fsdp(model) else model


# --------------------------------------------------------------------------- checkpoints


def rng_states(local: dict) -> list[dict] | None:
    """Every rank's random state (collective), for an exact resume; None in a single process."""
    if world_size() == 1:
        return None
    states = [None] * world_size()
    dist.all_gather_object(states, local)
    return states


def topology() -> dict:
    """What a checkpoint records about the processes that wrote it."""
    return {"world_size": world_size(), "strategy": strategy()}


def check_resume(state: dict, path, stage: str) -> None:
    """Refuse a checkpoint written by another number of processes or strategy (its optimizer state
    layout and per-rank random streams belong to that topology)."""
    theirs = {"world_size": state.get("world_size", 1), "strategy": state.get("strategy")}
    ours = topology()
    if theirs != ours:
        def say(t):
            return f"{t['world_size']} process(es)" + (f" ({t['strategy']})" if t["strategy"] else "")
        raise LmforgeError(
            f"{stage}: {path} was written by a run with {say(theirs)}, this run has {say(ours)}. "
            f"Rerun with distributed.nproc: {theirs['world_size']}"
            + (f" and distributed.strategy: {theirs['strategy']}" if theirs["strategy"] else "")
            + f" to resume it, or set '{stage}.resume: false' to start over (with '{stage}.resume_from' and "
              f"'{stage}.resume_optimizer: false', its weights load at any number of processes)")


# --------------------------------------------------------------------------- launch


def _stream(s):
    try:
        s.fileno()
        return s
    except (AttributeError, OSError, ValueError):
        return None


def launch(stage: str, params: dict, inputs: dict, outputs: dict, env, *, nproc: int = 1,
           strategy: str = "ddp"):
    """Run ``lmforge.stages.<stage>.run(params, inputs, outputs, env)`` in this process (nproc 1),
    or under ``torchrun --standalone --nproc_per_node nproc``; returns rank 0's result.

    A worker's error comes back as one LmforgeError (its traceback, if any, is in the log).
    """
    if nproc <= 1:
        return importlib.import_module(f"lmforge.stages.{stage}").run(params, inputs, outputs, env)
    configure(strategy)  # checks the name before any process starts
    with tempfile.TemporaryDirectory(prefix=f"lmforge-{stage}-") as tmp:
        spec = Path(tmp) / "spec.pkl"
        spec.write_bytes(pickle.dumps({"stage": stage, "params": params, "inputs": inputs, "outputs": outputs,
                                       "env": env, "strategy": strategy}))
        cmd = [sys.executable, "-m", "lmforge.distributed", "--torchrun", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "lmforge.distributed", str(spec)]
        threads = max(1, (env.threads or os.cpu_count() or 1) // nproc)
        child_env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"{stage}: {nproc} processes ({strategy}) under torchrun, {threads} thread(s) each", file=sys.stderr,
              flush=True)
        rc = subprocess.run(cmd, env=child_env, stdout=_stream(sys.stdout), stderr=_stream(sys.stderr)).returncode
        if rc != 0:
            errors = sorted(Path(tmp).glob("error.*.txt"))
            msg = errors[0].read_text() if errors else f"torchrun exited with code {rc}"
            raise LmforgeError(msg)
        result = Path(tmp) / "result.pkl"
        return pickle.loads(result.read_bytes()) if result.exists() else None


def _torchrun(args: list[str]) -> int:
    """torchrun itself, minus the traceback it prints when a worker fails (the worker left its own error)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(args)
    except ChildFailedError:
        return 1
    return 0


def main(argv: list[str]) -> int:
    """``--torchrun ARGS``: the launcher; else a torchrun worker running the spec file :func:`launch` wrote."""
    if argv and argv[0] == "--torchrun":
        return _torchrun(argv[1:])
    spec_path = Path(argv[0])
    spec = pickle.loads(spec_path.read_bytes())
    configure(spec["strategy"])
    me = int(os.environ.get("RANK", "0"))
    real_stderr = sys.stderr
    if me != 0:  # one voice in the log: rank 0's
        sys.stdout = sys.stderr = open(os.devnull, "w")
    try:
        result = importlib.import_module(f"lmforge.stages.{spec['stage']}").run(
            spec["params"], spec["inputs"], spec["outputs"], spec["env"])
        if me == 0:
            (spec_path.parent / "result.pkl").write_bytes(pickle.dumps(result))
        return 0
    except LmforgeError as e:
        (spec_path.parent / f"error.{me:04d}.txt").write_text(str(e))
        return 1
    except Exception as e:
        traceback.print_exc(file=real_stderr)
        (spec_path.parent / f"error.{me:04d}.txt").write_text(
            f"{spec['stage']}: unexpected failure on rank {me}: {type(e).__name__}: {e} (traceback in the log)")
        return 1
    finally:
        shutdown()


if __name__ == "__main__":
    # Run through the imported module, not this __main__ copy, so the stage sees the state configure() set.
    import lmforge.distributed as _module

    sys.exit(_module.main(sys.argv[1:]))
