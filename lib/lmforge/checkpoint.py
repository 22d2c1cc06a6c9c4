"""The lmforge model file: save a model with its config and tokenizer, read one back, rebuild the model.

A model file (``results/<stage>/model.pt``) is a dict::

    {"format": "lmforge", "kind": "causal_lm" | "reward_model",
     "model_config": {...}, "state_dict": {...},
     "tokenizer": "<tokenizer.json text>", "tokenizer_sha256": "...",
     "meta": {"stage": ..., "step": ..., "mlflow_run_id": ...}}

A LoRA stage writes ``"kind": "lora"`` instead (only the adapter tensors and the
base it belongs to); this module reads such a file as it is. Turning any model
file, an adapter file or a Hugging Face folder into a model is ``lmforge.loader``'s
job, which every consumer goes through.

Files are written to a temp file beside the target and renamed into place
(``lmforge.files``), so a reader never sees a half-written checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.files import atomic_write
from lmforge.model import ModelConfig, RewardModel, Transformer
from lmforge.tokenizer import LMTokenizer

KINDS = ("causal_lm", "reward_model")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def model_payload(model: torch.nn.Module, *, kind: str, model_config: dict, tokenizer, meta: dict) -> dict:
    assert kind in KINDS, kind
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    return {"format": "lmforge", "kind": kind, "model_config": dict(model_config), "state_dict": state,
            "tokenizer": tokenizer.to_str(), "tokenizer_sha256": tokenizer.sha256, "meta": dict(meta)}


def save_model(path: str | Path, model: torch.nn.Module, **kw) -> None:
    atomic_torch_save(model_payload(model, **kw), path)


def read_file(path: str | Path) -> dict:
    """The dict an lmforge model file holds, as stored (an adapter file's base is not read)."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise LmforgeError(f"{path}: not a readable checkpoint ({e.__class__.__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "lmforge":
        raise LmforgeError(f"{path}: not an lmforge checkpoint")
    return ckpt


def check_kind(ckpt: dict, path: str | Path, kind: str) -> None:
    if ckpt["kind"] != kind:
        want = "a causal language model" if kind == "causal_lm" else "a reward model"
        raise LmforgeError(f"{path}: is a {ckpt['kind']} checkpoint, but {want} is needed here")


def instantiate(ckpt: dict, path: str | Path, *, kind: str = "causal_lm", device: str | torch.device = "cpu"):
    """(model, tokenizer) of a full checkpoint dict (all weights in its state_dict)."""
    check_kind(ckpt, path, kind)
    cfg = ModelConfig.from_dict(ckpt["model_config"]).validate()
    model = Transformer(cfg) if kind == "causal_lm" else RewardModel(Transformer(cfg))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device), LMTokenizer.from_str(ckpt["tokenizer"])
