"""Atomic save/load of model checkpoints; the model config and tokenizer travel with the weights.

A model file (``results/<stage>/model.pt``) is a dict::

    {"format": "lmforge", "kind": "causal_lm" | "reward_model",
     "model_config": {...}, "state_dict": {...},
     "tokenizer": "<tokenizer.json text>", "tokenizer_sha256": "...",
     "meta": {"stage": ..., "step": ..., "mlflow_run_id": ...}}

A LoRA stage writes ``"kind": "lora"`` instead: only the adapter tensors, and the
base checkpoint's path and sha256 (layout in ``lmforge.lora``). ``read_checkpoint``
and ``load_model`` resolve such a file into the adapted model's checkpoint, so
every consumer takes either.

A folder holding a Llama/Mistral/Qwen2 ``config.json`` and ``model.safetensors`` (what
``lmforge export`` writes) reads as the same dict, converted by ``lmforge.hf``.

Every write goes to a temp file in the same folder and is renamed into place,
so a reader never sees a half-written file under the final name.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError

KINDS = ("causal_lm", "reward_model")


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(binary file)`` on a temp file beside ``path``, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: str | Path) -> str:
    """Content hash of a file, or of every file under a folder (names included)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            # Name and size delimit each file, so ("a": "bc") and ("ab": "c") hash differently.
            h.update(f"{p.relative_to(path).as_posix()}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_payload(model: torch.nn.Module, *, kind: str, model_config: dict, tokenizer, meta: dict) -> dict:
    assert kind in KINDS, kind
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    return {"format": "lmforge", "kind": kind, "model_config": dict(model_config), "state_dict": state,
            "tokenizer": tokenizer.to_str(), "tokenizer_sha256": tokenizer.sha256, "meta": dict(meta)}


def save_model(path: str | Path, model: torch.nn.Module, **kw) -> None:
    atomic_torch_save(model_payload(model, **kw), path)


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"checkpoint not found: {path}")
    if path.is_dir():  # a Hugging Face folder (config.json + model.safetensors), e.g. from `lmforge export`
        from lmforge.hf import read_folder

        return read_folder(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise LmforgeError(f"{path}: not a readable checkpoint ({e.__class__.__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "lmforge":
        raise LmforgeError(f"{path}: not an lmforge checkpoint")
    if ckpt["kind"] == "lora":  # adapters: read (and check) their base too
        from lmforge.lora import resolve_adapter

        return resolve_adapter(ckpt, path)
    return ckpt


def load_model(path: str | Path, *, kind: str = "causal_lm", device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint holds. Returns (model, tokenizer, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    model, tok = build_model(ckpt, path, kind=kind, device=device)
    return model, tok, ckpt


def build_model(ckpt: dict, path: str | Path, *, kind: str = "causal_lm", device: str | torch.device = "cpu"):
    """(model, tokenizer) from a checkpoint already read with ``read_checkpoint(path)``."""
    from lmforge.model import ModelConfig, RewardModel, Transformer
    from lmforge.tokenizer import LMTokenizer

    if ckpt["kind"] != kind:
        want = "a causal language model" if kind == "causal_lm" else "a reward model"
        raise LmforgeError(f"{path}: is a {ckpt['kind']} checkpoint, but {want} is needed here")
    if "adapter" in ckpt:
        from lmforge.lora import build_adapted

        return build_adapted(ckpt, path, device=device)
    cfg = ModelConfig.from_dict(ckpt["model_config"]).validate()
    model = Transformer(cfg) if kind == "causal_lm" else RewardModel(Transformer(cfg))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device), LMTokenizer.from_str(ckpt["tokenizer"])
