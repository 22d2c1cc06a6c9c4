"""Any model file into a model: an lmforge checkpoint, a LoRA adapter file on its base, or a Hugging Face folder.

Every consumer of a model (stages, rewards, references, the command line) reads
through ``read_checkpoint`` / ``load_model`` / ``build_model`` here, so each takes
all three forms:

- a full lmforge file (``lmforge.checkpoint``): read as it is;
- a LoRA adapter file (``"kind": "lora"``, below): its base is read and checked, and
  the result is the checkpoint of the adapted model;
- a folder with a Llama/Mistral/Qwen2 ``config.json`` and ``model.safetensors``
  (what ``export`` writes): converted by ``lmforge.hf``.

An adapter file on disk (``results/<stage>/model.pt`` of a LoRA stage)::

    {"format": "lmforge", "kind": "lora", "model_kind": "causal_lm" | "reward_model",
     "base": "<base checkpoint, relative to this file's folder>", "base_sha256": "...",
     "lora": {r, alpha, dropout, target_modules, quantize, double_quant},
     "model_config": {... the base's}, "tokenizer_sha256": "...", "meta": {...},
     "state_dict": {adapter tensors (+ a fresh head)}}

``read_checkpoint`` turns that into the checkpoint of the adapted model: the
base's kind-independent fields (model_config, tokenizer), ``kind`` = model_kind,
and two more keys, ``adapter`` (where base and adapters are) and
``base_checkpoint`` (the base, already read), which ``build_model`` uses.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoint import atomic_torch_save, check_kind, instantiate, read_file, save_model
from lmforge.errors import LmforgeError
from lmforge.files import file_sha256
from lmforge.hf import check_dtype, read_folder, write_folder
from lmforge.lora import LoraConfig, adapter_state, apply_lora, load_adapter_state, lora_config_of, merge_lora
from lmforge.model import RewardModel


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict of any model file or folder (an adapter file resolved on its base)."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"checkpoint not found: {path}")
    if path.is_dir():  # a Hugging Face folder (config.json + model.safetensors), e.g. from `lmforge export`
        return read_folder(path)
    ckpt = read_file(path)
    if ckpt["kind"] == "lora":  # adapters: read (and check) their base too
        return resolve_adapter(ckpt, path)
    return ckpt


def build_model(ckpt: dict, path: str | Path, *, kind: str = "causal_lm", device: str | torch.device = "cpu"):
    """(model, tokenizer) from a checkpoint already read with ``read_checkpoint(path)``."""
    if "adapter" in ckpt:
        check_kind(ckpt, path, kind)
        return build_adapted(ckpt, path, device=device)
    return instantiate(ckpt, path, kind=kind, device=device)


def load_model(path: str | Path, *, kind: str = "causal_lm", device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint holds. Returns (model, tokenizer, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    model, tok = build_model(ckpt, path, kind=kind, device=device)
    return model, tok, ckpt


def export(checkpoint: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Write any model file (or folder) as a transformers folder ``out_dir``; returns out_dir.
    A LoRA/QLoRA checkpoint has its adapters folded into plain float weights first."""
    check_dtype(dtype)
    model, tok, _ = load_model(checkpoint)
    merge_lora(model)
    return write_folder(model, tok, out_dir, dtype=dtype)


# --------------------------------------------------------------------------- adapter files


def save_adapter(path: str | Path, model: nn.Module, *, base: str | Path, kind: str, model_config: dict,
                 tokenizer, meta: dict) -> None:
    """Write ``model``'s adapters as a ``kind: lora`` checkpoint whose base is the checkpoint file ``base``."""
    if base is None:
        raise ValueError("save_adapter: a LoRA model is saved relative to its base checkpoint; pass base=")
    path, base = Path(path), Path(base)
    cfg = lora_config_of(model)
    payload = {"format": "lmforge", "kind": "lora", "model_kind": kind,
               "base": Path(os.path.relpath(base.resolve(), path.resolve().parent)).as_posix(),
               "base_sha256": file_sha256(base), "lora": cfg.to_dict(), "model_config": dict(model_config),
               "tokenizer_sha256": tokenizer.sha256, "meta": dict(meta), "state_dict": adapter_state(model)}
    atomic_torch_save(payload, path)


def resolve_adapter(raw: dict, path: str | Path, base: str | Path | None = None) -> dict:
    """The checkpoint dict of the adapted model from an adapter file's dict ``raw``.

    ``base`` overrides the recorded base path. The base must be the very file the
    adapters were trained on: its architecture and its sha256 are checked, and a
    mismatch is an error naming both files.
    """
    path = Path(path)
    if base is None:
        base = Path(os.path.normpath(path.parent / raw["base"]))
        if not base.exists():
            raise LmforgeError(f"{path}: its base checkpoint {base} is not there (the adapters need it; "
                               f"`lmforge merge {path} OUT --base BASE` names another place)")
    base = Path(base)
    base_ckpt = read_checkpoint(base)
    if base_ckpt["kind"] != "causal_lm" or base_ckpt["model_config"] != raw["model_config"]:
        theirs, ours = base_ckpt["model_config"], raw["model_config"]
        diff = ", ".join(f"{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in sorted(set(ours) | set(theirs))
                         if ours.get(k) != theirs.get(k))
        raise LmforgeError(f"the adapters {path} do not fit the base {base}: "
                           f"{diff or 'the base is a ' + base_ckpt['kind'] + ' checkpoint'}")
    sha = file_sha256(base)
    if sha != raw["base_sha256"]:
        raise LmforgeError(f"the adapters {path} were trained on a base with sha256 {raw['base_sha256'][:12]}, "
                           f"but {base} has sha256 {sha[:12]}: not the same base checkpoint")
    return {"format": "lmforge", "kind": raw["model_kind"], "model_config": base_ckpt["model_config"],
            "tokenizer": base_ckpt["tokenizer"], "tokenizer_sha256": base_ckpt["tokenizer_sha256"],
            "meta": raw["meta"], "state_dict": raw["state_dict"],
            "adapter": {"path": str(path), "base": str(base), "base_sha256": sha, "lora": raw["lora"]},
            "base_checkpoint": base_ckpt}


def build_adapted(ckpt: dict, path: str | Path, *, device="cpu"):
    """(model, tokenizer) of a resolved adapter checkpoint: the base rebuilt (and quantized as in
    training), the adapters applied, the adapter tensors loaded."""
    info = ckpt["adapter"]
    trunk, tok = build_model(ckpt["base_checkpoint"], info["base"], device=device)
    key = f"{path}: lora"
    apply_lora(trunk, LoraConfig.from_dict(info["lora"], key=key), key=key)
    model = RewardModel(trunk).to(device) if ckpt["kind"] == "reward_model" else trunk
    load_adapter_state(model, ckpt["state_dict"], source=path)
    return model, tok


def read_adapter(path: str | Path) -> dict:
    """The raw dict of an adapter checkpoint file (its base not yet read)."""
    raw = read_file(path)
    if raw.get("kind") != "lora":
        raise LmforgeError(f"{path}: not a LoRA adapter checkpoint (kind: lora); nothing to merge")
    return raw


def merge_checkpoint(adapter: str | Path, out: str | Path, *, base: str | Path | None = None) -> dict:
    """Fold an adapter checkpoint into its base: write a full checkpoint of the adapted model to ``out``.

    ``base`` overrides the base path the adapters record (it must be the same file: same sha256).
    A QLoRA base is dequantized: the result is float32. Returns the written checkpoint's meta.
    """
    ckpt = resolve_adapter(read_adapter(adapter), adapter, base)
    model, tok = build_adapted(ckpt, adapter)
    merge_lora(model)
    meta = {**ckpt["meta"], "merged_from": str(adapter), "base": ckpt["adapter"]["base"],
            "base_sha256": ckpt["adapter"]["base_sha256"], "lora": ckpt["adapter"]["lora"]}
    save_model(out, model, kind=ckpt["kind"], model_config=ckpt["model_config"], tokenizer=tok, meta=meta)
    return meta
