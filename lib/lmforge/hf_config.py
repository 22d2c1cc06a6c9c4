"""A Hugging Face model folder's config.json read as our ``ModelConfig``, and ``model.init_from`` checked.

Torch-free: checking a config (``model.init_from``) reads only config.json and
looks for the other files; ``lmforge.hf`` loads the weights and converts the
tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.model_config import ModelConfig

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", WEIGHTS_INDEX, "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path}: not a readable {what} ({e})") from None


def read_hf_config(folder: Path) -> dict:
    """config.json of a Llama, Mistral or Qwen2 folder; anything else is a LmforgeError naming folder and field."""
    path = folder / "config.json"
    if not path.exists():
        raise LmforgeError(f"{folder}: no config.json (not a Hugging Face model folder)")
    hf = read_json(path, "config.json")
    family = hf.get("model_type")
    if family not in FAMILIES:
        archs = hf.get("architectures")
        raise LmforgeError(
            f"{path}: model_type {family!r} (architectures {archs}) is not supported; lmforge reads "
            f"{', '.join(f'{k} ({v})' for k, v in FAMILIES.items())} models")
    return hf


def model_config_from_hf(hf: dict, where: str) -> ModelConfig:
    """Our ModelConfig for a Llama/Mistral/Qwen2 config.json; options we cannot compute are errors naming the field."""
    family = hf["model_type"]

    def refuse(field: str, why: str):
        raise LmforgeError(f"{where}: {field} = {hf.get(field)!r}: {why}")

    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "lmforge's gated MLP (swiglu) uses silu")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", "lmforge's MLP has no biases")
    if family == "llama" and hf.get("attention_bias"):
        refuse("attention_bias", "Llama puts it on o_proj too, lmforge only on q/k/v")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // heads) or d % heads:
        refuse("head_dim", f"lmforge's head dim is hidden_size / num_attention_heads ({d}/{heads})")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        refuse("rope_parameters" if rope else "rope_scaling",
               f"rope type '{rope_type}' is not lmforge's (only plain rope is read)")
    if hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse("partial_rotary_factor", "lmforge rotates the whole head")
    max_len = hf.get("max_position_embeddings", 2048)
    window = _window(hf, where)
    if window and window > max_len:  # a window longer than the context never applies
        window = None
    kv = hf.get("num_key_value_heads") or heads
    attention_type = "mha" if kv == heads else "mqa" if kv == 1 else "gqa"
    ff = hf["intermediate_size"]
    default_ff = ModelConfig(d_model=d, n_heads=heads).ff_dim  # null d_ff when it is our swiglu default
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=kv if attention_type == "gqa" else None, d_ff=None if ff == default_ff else ff,
        max_seq_len=max_len, positional_encoding="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), attention_type=attention_type,
        sliding_window=window, attention_bias=family == "qwen2", norm_type="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), activation="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False))).validate()


def _window(hf: dict, where: str) -> int | None:
    """The sliding window if every layer has it, None if none has; a per-layer mix is an error."""
    family, n = hf["model_type"], hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    if family == "llama" or not window:
        return None
    if family == "qwen2":
        if hf.get("layer_types"):
            kinds = set(hf["layer_types"])
        elif not hf.get("use_sliding_window"):
            return None
        else:
            kinds = {"sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention"
                     for i in range(n)}
        if kinds == {"full_attention"}:
            return None
        if kinds != {"sliding_attention"}:
            raise LmforgeError(f"{where}: layer_types / max_window_layers = {hf.get('max_window_layers')!r}: a sliding "
                               f"window on some layers only; lmforge's model.sliding_window applies to every layer")
    return int(window)


def resolve(init_from: str) -> Path:
    """The local folder of ``hf:PATH``: PATH itself when it is a folder, else a hub snapshot (config,
    weights and tokenizer files only) through huggingface_hub."""
    spec = init_from.removeprefix("hf:")
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists() or spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise LmforgeError(f"model.init_from '{init_from}': no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=HUB_FILES))
    except Exception as e:
        raise LmforgeError(f"model.init_from '{init_from}': not a local folder, and fetching it from the "
                           f"Hugging Face hub failed ({e.__class__.__name__}: {e})") from None


def check_folder(folder: Path) -> None:
    """Everything init_from needs is there and readable as ours (cheap: no weights are loaded)."""
    hf = read_hf_config(folder)
    model_config_from_hf(hf, str(folder / "config.json"))
    if not (folder / "tokenizer.json").exists():
        raise LmforgeError(f"{folder}: no tokenizer.json (lmforge needs the model's fast tokenizer file)")
    if not ((folder / WEIGHTS).exists() or (folder / WEIGHTS_INDEX).exists()):
        raise LmforgeError(f"{folder}: no {WEIGHTS} (or {WEIGHTS_INDEX}); only safetensors weights are read")


def check_init_from(init_from: str) -> None:
    """Config-time check of ``model.init_from``: a local folder is checked now, a hub id when it is fetched."""
    if not init_from.startswith("hf:"):
        raise LmforgeError(f"config key 'model.init_from' ({init_from!r}) must look like 'hf:PATH' "
                           f"(a local folder or a Hugging Face hub id)")
    path = Path(init_from.removeprefix("hf:")).expanduser()
    if path.exists() or init_from.removeprefix("hf:").startswith(("/", ".", "~")):
        try:
            check_folder(resolve(init_from))
        except LmforgeError as e:
            raise LmforgeError(f"config key 'model.init_from': {e}") from None
