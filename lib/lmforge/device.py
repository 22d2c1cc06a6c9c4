"""Device choice, precision and seeding: the one place that knows CPU from CUDA."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from lmforge.errors import LmforgeError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmforgeError(f"config key 'device' is '{name}' but CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise LmforgeError("config key 'device' is 'mps' but MPS is not available on this machine")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 elsewhere (bf16 on CPU is 10-100x slower than fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def available_cores() -> int:
    """The cores this process may use: a SLURM job's allocation or the CPU affinity, not the whole node."""
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(available_cores())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
