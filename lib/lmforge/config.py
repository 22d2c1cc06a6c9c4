"""Load, default and check the pipeline config.

One schema (``config.schema.yaml`` beside this file, also used by Snakemake's
``validate()``) gives types, allowed values and defaults; ``check_config`` adds
the cross-field rules a schema cannot express. Every message names the key.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from lmforge.errors import LmforgeError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
TRAIN_SECTIONS = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "star")
REWARD_SECTIONS = ("score", "ppo", "grpo")  # sections with a reward_fn


def load_schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def _fill_defaults(node: dict, schema: dict) -> None:
    """Insert schema defaults for missing keys, recursing into nested objects."""
    for key, sub in schema.get("properties", {}).items():
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if isinstance(node.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(node[key], sub)


def _key_of(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator in ("anyOf", "oneOf") and error.context:
        # "null or an object of ...": the object branch's complaint is the useful one.
        specific = [e for e in error.context if e.validator != "type"]
        if not specific:
            kinds = [e.validator_value for e in error.context]
            return f"config key '{_key_of(error)}': expected one of {kinds}, got {error.instance!r}"
        return _message(jsonschema.exceptions.best_match(specific))
    key = _key_of(error)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        where = f"'{key}'" if error.absolute_path else "the top level"
        return (f"unknown config key(s) {', '.join(repr(e) for e in extra)} in {where} "
                f"(allowed: {', '.join(allowed)})")
    if error.validator == "enum":
        return (f"config key '{key}': {error.instance!r} is not allowed "
                f"(choose from {', '.join(map(str, error.validator_value))})")
    if error.validator == "type":
        return f"config key '{key}': expected {error.validator_value}, got {error.instance!r}"
    return f"config key '{key}': {error.message}"


def apply_schema(config: dict) -> dict:
    """Return a copy of ``config`` with defaults filled in, or raise on the first schema error."""
    schema = load_schema()
    config = copy.deepcopy(config or {})
    if not isinstance(config, dict):
        raise LmforgeError("the config must be a mapping of sections (model:, pretrain:, …)")
    # Report errors before filling defaults so an unknown key is not drowned by others.
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), _key_of(e)))
    if errors:
        raise LmforgeError(_message(errors[0]))
    _fill_defaults(config, schema)
    return config


def check_config(config: dict) -> dict:
    """Schema + defaults + cross-field rules. Returns the completed config."""
    config = apply_schema(config)
    from lmforge.model import ModelConfig  # local: model imports torch

    init_from = config["model"].get("init_from")
    ModelConfig.from_section(config["model"])
    tok = config["tokenizer"]
    if init_from:  # the imported model brings its tokenizer and its shape
        from lmforge.hf import check_init_from

        if tok["type"] == "pretrained":
            raise LmforgeError("config keys 'model.init_from' and 'tokenizer.type: pretrained' conflict: "
                               "an imported model comes with its own tokenizer; remove one of them")
        check_init_from(init_from)
    elif tok["type"] == "bpe" and tok["vocab_size"] > config["model"]["vocab_size"]:
        raise LmforgeError(
            f"config key 'tokenizer.vocab_size' ({tok['vocab_size']}) exceeds "
            f"'model.vocab_size' ({config['model']['vocab_size']})")
    if tok["type"] == "pretrained" and not tok["path"]:
        raise LmforgeError("config key 'tokenizer.path' is required when tokenizer.type is 'pretrained'")
    for section in TRAIN_SECTIONS:
        if section in config:
            TrainConfig.from_dict(config[section], key=section)
    from lmforge.rewards import RewardSpec

    for section in REWARD_SECTIONS:
        RewardSpec.from_dict(config[section]["reward_fn"], key=f"{section}.reward_fn")
    for section in ("dpo", "ppo", "grpo"):
        minibatches(config[section], section)
    from lmforge.train.dpo import check_section

    check_section(config["dpo"])
    grpo = config["grpo"]
    if grpo["group_size"] < 2:
        raise LmforgeError(f"config key 'grpo.group_size' is 1 (with 'grpo.scale_rewards': {grpo['scale_rewards']}): "
                           f"an advantage is a reward minus its group's mean, so a group of one sample always has "
                           f"advantage 0 (and no std to scale by); use group_size >= 2")
    return config


def minibatches(section: dict, key: str) -> int:
    """How many mini-batches one batch splits into (DPO, PPO, GRPO); mini_batch_size null = the whole batch."""
    batch, mini = section["batch_size"], section.get("mini_batch_size") or section["batch_size"]
    if batch % mini:
        raise LmforgeError(f"config key '{key}.mini_batch_size' ({mini}) must divide '{key}.batch_size' ({batch})")
    accum = section.get("grad_accum_steps", 1)
    if accum != 1:
        raise LmforgeError(f"config key '{key}.grad_accum_steps' ({accum}) is not used by {key}: "
                           f"'{key}.batch_size' / '{key}.mini_batch_size' set how a batch is split; remove it")
    return batch // mini



def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"config file not found: {path}")
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise LmforgeError(f"{path}: the config must be a mapping of sections (model:, pretrain:, …)")
    for dotted, value in (overrides or {}).items():
        node = config
        *parents, last = dotted.split(".")
        for i, p in enumerate(parents):
            if node.get(p) is None:  # absent, or an empty section left in the file
                node[p] = {}
            if not isinstance(node[p], dict):
                raise LmforgeError(f"{path}: cannot set '{dotted}': "
                                   f"'{'.'.join(parents[:i + 1])}' is not a section")
            node = node[p]
        node[last] = value
    try:
        return check_config(config)
    except LmforgeError as e:
        raise LmforgeError(f"{path}: {e}") from None


@dataclass
class TrainConfig:
    """The knobs every gradient-based stage shares (see config.schema.yaml for meanings)."""

    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    lr_power: float = 1.0
    batch_size: int = 16
    grad_accum_steps: int = 1
    max_steps: int = 100
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_steps: int = 10
    patience: int = 0
    save_best_only: bool = True
    checkpoint_every: int = 50
    log_every: int = 10
    resume: bool = True
    resume_from: str | None = None
    resume_optimizer: bool = True

    @classmethod
    def from_dict(cls, section: dict[str, Any], key: str) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in section.items() if k in names})
        if cfg.max_steps and cfg.warmup_steps >= cfg.max_steps:  # (max_steps 0 trains nothing: no schedule)
            raise LmforgeError(
                f"config key '{key}.warmup_steps' ({cfg.warmup_steps}) must be smaller than "
                f"'{key}.max_steps' ({cfg.max_steps})")
        if cfg.batch_size < 1 or cfg.grad_accum_steps < 1:
            raise LmforgeError(f"config keys '{key}.batch_size' and '{key}.grad_accum_steps' must be positive")
        return cfg

    @staticmethod
    def split(section: dict[str, Any]) -> tuple[dict, dict]:
        """Split a stage section into (shared training knobs, stage-specific knobs)."""
        names = {f.name for f in fields(TrainConfig)}
        return ({k: v for k, v in section.items() if k in names},
                {k: v for k, v in section.items() if k not in names})
