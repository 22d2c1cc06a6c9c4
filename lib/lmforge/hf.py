"""Hugging Face interop: export a causal LM as a transformers folder, read such a folder back.

An exported folder is what ``transformers.AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load::

    config.json               LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM
    model.safetensors         the weights under Hugging Face names
    tokenizer.json            the tokenizer itself
    tokenizer_config.json     bos/eos/pad tokens and lmforge's chat template
    generation_config.json    bos/eos/pad ids and lmforge's default sampling (temperature 0.7, top_p 0.9)

Which family: rope + rmsnorm + swiglu is Llama; a q/k/v bias makes it Qwen2 (whose
o_proj has none, like ours; Llama's attention_bias would put one on o_proj too); a
sliding window without a bias is Mistral (Llama has no window). Our module names are
Llama's without the ``model.`` prefix of the trunk, and ``apply_rope`` rotates the
pairs (i, i + hd/2) as transformers' ``rotate_half`` does, so no weight is permuted.

Reading a folder (``read_folder``) builds an ordinary lmforge checkpoint dict, so
anything that loads a model through ``lmforge.loader`` accepts a folder (and
``loader.export`` writes one from any model file); ``model.init_from: hf:PATH``
starts the pipeline from one (tokenizer stage: ``import_tokenizer``; pretrain:
``init_model``). A foreign tokenizer is converted to lmforge's special tokens (see
``convert_tokenizer``); tokens it lacks are appended and their embedding rows start
at the mean of the model's trained rows.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from lmforge.config import load_schema
from lmforge.errors import LmforgeError
from lmforge.files import atomic_write_json
from lmforge.hf_config import (FAMILIES, WEIGHTS, WEIGHTS_INDEX, check_folder,  # noqa: F401 (re-exported)
                               check_init_from, model_config_from_hf, read_hf_config, read_json, resolve)
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import BOS, END, EOS, PAD, SPECIAL_TOKENS, LMTokenizer

SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}  # the lmforge chat/generate defaults
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Keys of the model section that describe the architecture; init_from takes them from config.json.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "positional_encoding",
              "rope_theta", "rope_scaling_factor", "original_max_seq_len", "attention_type", "sliding_window",
              "attention_bias", "norm_type", "norm_eps", "activation", "tie_embeddings")


# --------------------------------------------------------------------------- export


def export_family(cfg: ModelConfig) -> str:
    """The transformers model_type that computes exactly what ``cfg`` does, or a LmforgeError naming the option."""
    families = "Llama, Mistral and Qwen2"
    if cfg.positional_encoding == "yarn":
        raise LmforgeError(
            "model.positional_encoding 'yarn' cannot be exported: transformers' yarn ramps between interpolated and "
            "original frequencies linearly over the (rounded) dimension index, lmforge's over the number of rotations "
            "(model.yarn_frequencies), so the two give different frequencies for the same factor")
    if cfg.positional_encoding != "rope":
        raise LmforgeError(
            f"model.positional_encoding '{cfg.positional_encoding}' cannot be exported: {families} encode positions "
            f"only with rotary embeddings (rope); there is no place for "
            f"{'attention biases' if cfg.positional_encoding == 'alibi' else 'a position table'} in their weights")
    if cfg.norm_type != "rmsnorm":
        raise LmforgeError(
            f"model.norm_type '{cfg.norm_type}' cannot be exported: {families} use RMSNorm (no mean subtraction, "
            f"no bias); a LayerNorm model would compute something else there")
    if cfg.activation != "swiglu":
        raise LmforgeError(
            f"model.activation '{cfg.activation}' cannot be exported: {families} have a gated SiLU MLP "
            f"(swiglu: gate_proj, up_proj, down_proj)")
    if cfg.attention_bias:
        return "qwen2"
    return "mistral" if cfg.window else "llama"


def hf_config(cfg: ModelConfig, tok: LMTokenizer | None = None, dtype: str = "float32") -> dict:
    """config.json of the transformers model that matches ``cfg``.

    The rope base is written both as ``rope_parameters`` (transformers 5) and as
    ``rope_theta`` / ``rope_scaling`` (transformers 4), so either version reads it.
    """
    family = export_family(cfg)
    out = {
        "architectures": [FAMILIES[family]], "model_type": family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": float(cfg.rope_theta), "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
    }
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif family == "mistral":
        out.update(sliding_window=cfg.window)
    else:  # qwen2: max_window_layers 0 = the window (if any) applies to every layer, as ours does
        out.update(use_sliding_window=cfg.window is not None, sliding_window=cfg.window,
                   max_window_layers=0 if cfg.window else cfg.n_layers,
                   layer_types=[("sliding" if cfg.window else "full") + "_attention"] * cfg.n_layers)
    if tok is not None:
        out.update(bos_token_id=tok.bos_id, eos_token_id=tok.end_id, pad_token_id=tok.pad_id)
    return out


def hf_name(key: str) -> str:
    """Our parameter name -> the Hugging Face one: the trunk lives under ``model.``."""
    return key if key.startswith("lm_head.") else "model." + key


def to_hf_state_dict(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Weights under Hugging Face names, contiguous CPU copies; a tied lm_head is left out (transformers re-ties it)."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        out[hf_name(key)] = value.detach().to("cpu", dtype).contiguous().clone()
    return out


def generation_config(tok: LMTokenizer) -> dict:
    """generation_config.json: stop at the end of a turn or of a document, sample as lmforge does by default."""
    return {"bos_token_id": tok.bos_id, "eos_token_id": [tok.end_id, tok.eos_id], "pad_token_id": tok.pad_id,
            **SAMPLING}


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise LmforgeError(f"export dtype '{dtype}' must be one of: {', '.join(DTYPES)}")


def write_folder(model: Transformer, tok: LMTokenizer, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Write a plain model (no adapters) and its tokenizer as a transformers folder ``out_dir``. Returns out_dir.

    The files are written to a temp folder beside ``out_dir`` first and moved in at the end,
    so a failed export leaves no half-written folder. (``lmforge.loader.export`` does it for a model file.)
    """
    from safetensors.torch import save_file

    check_dtype(dtype)
    config = hf_config(model.cfg, tok, dtype)  # raises before anything is written
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LmforgeError(f"export: {out_dir} exists and is not a folder")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(to_hf_state_dict(model, DTYPES[dtype]), str(tmp / WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "generation_config.json", generation_config(tok))
        tok.save(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------- reading a folder


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors (or of the shards its index lists), as float32."""
    from safetensors.torch import load_file

    if (folder / WEIGHTS).exists():
        files = [folder / WEIGHTS]
    else:
        index = read_json(folder / WEIGHTS_INDEX, WEIGHTS_INDEX)
        files = [folder / f for f in sorted(set(index.get("weight_map", {}).values()))]
    state = {}
    for f in files:
        if not f.exists():
            raise LmforgeError(f"{folder}: {f.name} is missing (listed in {WEIGHTS_INDEX})")
        state.update(load_file(str(f)))
    return {k: v.float() for k, v in state.items()}


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """Hugging Face names -> ours; rotary inv_freq buffers are dropped, anything unexpected is an error."""
    state = {}
    for key, value in hf_state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        state[key if key.startswith("lm_head.") else key.removeprefix("model.")] = value
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state.get("embed_tokens.weight")
    names = _expected_names(cfg)
    missing = sorted(k for k in names if state.get(k) is None)
    unexpected = sorted(set(state) - names)
    if missing or unexpected:
        raise LmforgeError(f"{where}: the weights do not match config.json: missing "
                           f"{[hf_name(k) for k in missing][:5]}, unexpected {[hf_name(k) for k in unexpected][:5]}")
    return state


def _expected_names(cfg: ModelConfig) -> set[str]:
    """Our parameter names for ``cfg``, without building the model."""
    names = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        names |= {p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight")}
        for proj in ("q_proj", "k_proj", "v_proj"):
            names.add(f"{p}self_attn.{proj}.weight")
            if cfg.attention_bias:
                names.add(f"{p}self_attn.{proj}.bias")
    return names


def read_folder(folder: str | Path) -> dict:
    """An lmforge checkpoint dict (see checkpoint.py) from a Llama/Mistral/Qwen2 folder."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    where = str(folder / "config.json")
    cfg = model_config_from_hf(hf, where)
    tok, new_ids = convert_tokenizer(folder)
    state = from_hf_state_dict(_load_weights(folder), cfg, where)
    cfg, state = _fit_vocab(cfg, state, tok, new_ids)
    return {"format": "lmforge", "kind": "causal_lm", "model_config": cfg.to_dict(), "state_dict": state,
            "tokenizer": tok.to_str(), "tokenizer_sha256": tok.sha256,
            "meta": {"stage": "hf_import", "source": str(folder), "model_type": hf["model_type"]}}


def _fit_vocab(cfg: ModelConfig, state: dict, tok: LMTokenizer, new_ids: list[int]):
    """Grow the embedding (and an untied lm_head) to the converted tokenizer; tokens the model never
    saw start at the mean of the rows it did see, which keeps their logits ordinary."""
    if not new_ids:
        return cfg, state
    vocab = max(cfg.vocab_size, tok.vocab_size)
    new = torch.tensor(new_ids)
    seen = sorted(set(tok.tok.get_vocab(with_added_tokens=True).values()) - set(new_ids))  # the model's own tokens
    tables = ["embed_tokens.weight"] + ([] if cfg.tie_embeddings else ["lm_head.weight"])
    for key in tables:
        w = state[key]
        grown = torch.cat([w, w.new_zeros(vocab - w.shape[0], w.shape[1])])
        grown[new] = w[seen].mean(dim=0)
        state[key] = grown
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": vocab}), state


# --------------------------------------------------------------------------- tokenizer


def convert_tokenizer(folder: str | Path) -> tuple[LMTokenizer, list[int]]:
    """The folder's tokenizer.json with lmforge's special tokens. Returns (tokenizer, ids of added tokens).

    lmforge finds its tokens by name (``<|bos|>``, ``<|eos|>``, ``<|end|>``, ``<|pad|>`` and
    the role tokens), so the model's own tokens are renamed, keeping their ids and hence
    their trained embeddings: its bos_token becomes ``<|bos|>``, eos_token ``<|eos|>``, the
    token its chat template puts right after an assistant's answer (``<|im_end|>``,
    ``<|eot_id|>``; eos_token when there is none) ``<|end|>``, and pad_token ``<|pad|>``.
    A token already named like ours keeps that role, and no token takes two roles: a
    role left without one (Qwen2 has no bos; a pad that is the eos) gets a new token, as
    do the role tokens, since lmforge trains its own chat format.
    """
    from tokenizers import Tokenizer

    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists():
        raise LmforgeError(f"{folder}: no tokenizer.json (lmforge needs the model's fast tokenizer file)")
    data = read_json(path, "tokenizer.json")
    try:
        vocab = Tokenizer.from_str(json.dumps(data)).get_vocab(with_added_tokens=True)
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise LmforgeError(f"{path}: not a valid tokenizer.json: {e}") from None
    tcfg = read_json(folder / "tokenizer_config.json", "tokenizer_config.json") \
        if (folder / "tokenizer_config.json").exists() else {}
    smap = read_json(folder / "special_tokens_map.json", "special_tokens_map.json") \
        if (folder / "special_tokens_map.json").exists() else {}

    def named(key: str) -> str | None:
        value = tcfg.get(key) or smap.get(key)
        return value.get("content") if isinstance(value, dict) else value

    turn_end = None
    if END not in vocab:  # (an lmforge tokenizer has it: no template to render)
        specials = [t["content"] for t in data.get("added_tokens", []) if t.get("special")]
        turn_end = _turn_end(_chat_template(folder, tcfg), specials, named("bos_token"), named("eos_token"))
    wanted = {BOS: named("bos_token"), EOS: named("eos_token"), END: turn_end or named("eos_token"),
              PAD: named("pad_token")}
    claimed = {vocab[t] for t in SPECIAL_TOKENS if t in vocab}
    for ours, theirs in wanted.items():
        if ours in vocab or theirs not in vocab or vocab[theirs] in claimed:
            continue
        _rename(data, theirs, ours, vocab[theirs])
        claimed.add(vocab[theirs])
    tok = LMTokenizer(Tokenizer.from_str(json.dumps(data)))
    new_ids = sorted(set(tok.tok.get_vocab(with_added_tokens=True).values()) - set(vocab.values()))
    return tok, new_ids


def _chat_template(folder: Path, tcfg: dict) -> str | None:
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    return template


def _turn_end(template: str | None, specials: list[str], bos: str | None, eos: str | None) -> str | None:
    """The special token a chat template writes right after an assistant's answer, if any."""
    if not template:
        return None
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    marker = "lmforge-answer-7f3a"
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}]
    # transformers' {% generation %} markers (assistant masks) change no text: drop them for plain jinja.
    template = re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template)
    try:
        text = env.from_string(template).render(messages=messages, add_generation_prompt=False,
                                                bos_token=bos or "", eos_token=eos or "")
    except Exception:  # a template we cannot render tells us nothing; eos_token is the fallback
        return None
    if marker not in text:
        return None
    rest = text.split(marker, 1)[1].lstrip()
    found = [s for s in specials if s and rest.startswith(s)]
    return max(found, key=len) if found else None


def _rename(data: dict, old: str, new: str, token_id: int) -> None:
    """Rename token ``old`` (id ``token_id``) to ``new`` everywhere tokenizer.json names it."""
    for t in data.setdefault("added_tokens", []):
        if t["id"] == token_id:
            t["content"], t["special"] = new, True
            break
    else:
        data["added_tokens"].append({"id": token_id, "content": new, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and vocab.get(old) == token_id:
        vocab[new] = vocab.pop(old)
    elif isinstance(vocab, list) and token_id < len(vocab) and vocab[token_id][0] == old:  # unigram
        vocab[token_id][0] = new
    if data.get("post_processor"):
        data["post_processor"] = _replace_strings(data["post_processor"], old, new)


def _replace_strings(node, old: str, new: str):
    if isinstance(node, dict):
        return {(new if k == old else k): _replace_strings(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_strings(v, old, new) for v in node]
    return new if node == old else node


# --------------------------------------------------------------------------- model.init_from


def init_from_files(init_from: str | None, *names: str) -> dict[str, str]:
    """The files of a local ``init_from`` folder that a rule reads, as Snakemake inputs ({name: abs path}),
    so that replacing the folder's weights or tokenizer reruns what was built from them. ``names``:
    "config", "tokenizer", "weights" (the safetensors file, or the index of a sharded one). A hub id
    has no local files before it is fetched: {} (its staleness is its id)."""
    if not init_from:
        return {}
    folder = Path(init_from.removeprefix("hf:")).expanduser()
    if not folder.is_dir():
        return {}
    weights = WEIGHTS if (folder / WEIGHTS).exists() or not (folder / WEIGHTS_INDEX).exists() else WEIGHTS_INDEX
    files = {"config": "config.json", "tokenizer": "tokenizer.json", "weights": weights}
    return {f"init_from_{n}": str((folder / files[n]).resolve()) for n in names}


def import_tokenizer(init_from: str) -> LMTokenizer:
    """The tokenizer stage's tokenizer when model.init_from is set: the model's own, converted."""
    folder = resolve(init_from)
    check_folder(folder)
    return convert_tokenizer(folder)[0]


def init_model(model_params: dict, tok: LMTokenizer) -> tuple[Transformer, ModelConfig]:
    """The pretrain stage's starting model when model.init_from is set.

    The architecture comes from config.json; the model section keeps only max_seq_len
    (the context every later stage trains at) and dropout. A shape key the section sets
    to something other than its default and the imported value is reported, not used.
    """
    folder = resolve(model_params["init_from"])
    check_folder(folder)
    ckpt = read_folder(folder)
    if ckpt["tokenizer_sha256"] != tok.sha256:
        raise LmforgeError(f"the tokenizer is not the one of model.init_from ({folder}); rerun the tokenizer rule")
    imported = ckpt["model_config"]
    defaults = {k: v.get("default") for k, v in load_schema()["properties"]["model"]["properties"].items()}
    ignored = [f"model.{k}: {model_params[k]!r} (imported: {imported[k]!r})" for k in SHAPE_KEYS
               if k in model_params and model_params[k] != defaults.get(k) and model_params[k] != imported[k]]
    if ignored:
        print(f"warning: model.init_from sets the architecture; ignoring {'; '.join(ignored)}", file=sys.stderr)
    seq = model_params.get("max_seq_len", imported["max_seq_len"])
    if seq > imported["max_seq_len"]:
        print(f"warning: model.max_seq_len {seq} is longer than the imported model's context "
              f"({imported['max_seq_len']}); rope will extrapolate", file=sys.stderr)
    window = imported["sliding_window"]
    cfg = ModelConfig.from_dict({**imported, "max_seq_len": seq, "dropout": model_params.get("dropout", 0.0),
                                 "sliding_window": window if window and window < seq else None})
    model = Transformer(cfg)
    model.load_state_dict(ckpt["state_dict"])
    return model, cfg
