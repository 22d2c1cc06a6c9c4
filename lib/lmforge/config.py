"""Load, default and check the pipeline config.

One schema (``config.schema.yaml`` beside this file, also used by Snakemake's
``validate()``) gives types, allowed values and defaults; each section's rules
between keys live in its config class (``lmforge.sections``), which
``check_config`` runs one by one. A key that was renamed is an error naming its
new name. Every message names the key. Torch-free.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from lmforge.errors import LmforgeError
from lmforge.sections import SECTIONS, TrainConfig  # noqa: F401 (TrainConfig: re-exported)

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")

# Keys that were renamed or removed: old dotted key -> its new dotted key, or a sentence saying what
# to do instead. Checked before the schema, so that an old config fails with the way forward.
RENAMED = {
    "grpo.grpo_temperature": "grpo.temperature",
    "grpo.group_size": "grpo.samples_per_prompt",
    "score.k": "score.samples_per_prompt",
    "star.k": "star.samples_per_prompt",
    "eval.pass_k": "eval.samples_per_prompt",
    "grpo.epsilon": "grpo.clip_range",
    "grpo.epsilon_high": "grpo.clip_range_high",
    "dpo.clip_range": "was an alias of 'dpo.beta' and is removed: set 'dpo.beta'",
    "dpo.mini_batch_size": "is removed: 'dpo.batch_size' now counts the pairs of one forward-backward pass and "
                           "'dpo.grad_accum_steps' the passes per optimizer step (old batch_size B, mini_batch_size M: "
                           "batch_size M, grad_accum_steps B/M)",
    "ppo.mini_batch_size": "was renamed to 'ppo.batch_size' (rollouts per optimizer step), and the old "
                           "'ppo.batch_size' (prompts per iteration) to 'ppo.rollout_batch_size'",
    "grpo.mini_batch_size": "was renamed to 'grpo.batch_size' (prompts per optimizer step), and the old "
                            "'grpo.batch_size' (prompts per iteration) to 'grpo.rollout_batch_size'",
    **{f"{stage}.eval_steps": f"is removed: {stage} never used it (its evaluation covers the whole held-out "
                              f"split); delete the key" for stage in ("sft", "reward", "ppo", "grpo", "star")},
}


@functools.lru_cache(maxsize=None)
def _schema_text_parsed() -> dict:
    # libyaml's loader where PyYAML has it: building the DAG parses the schema on every snakemake call.
    with open(SCHEMA_PATH) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_schema() -> dict:
    """The config schema (a fresh copy: callers may change theirs)."""
    return copy.deepcopy(_schema_text_parsed())


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


def reject_renamed(config: dict) -> dict:
    """Raise on the first key of ``RENAMED`` that ``config`` sets, naming what replaces it; else return ``config``."""
    for old, new in RENAMED.items():
        section, key = old.split(".")
        if isinstance(config.get(section), dict) and key in config[section]:
            how = f"was renamed to '{new}'" if " " not in new else new
            raise LmforgeError(f"config key '{old}' {how}")
    return config


def apply_schema(config: dict) -> dict:
    """Return a copy of ``config`` with defaults filled in, or raise on the first schema error."""
    schema = load_schema()
    config = copy.deepcopy(config or {})
    if not isinstance(config, dict):
        raise LmforgeError("the config must be a mapping of sections (model:, pretrain:, …)")
    reject_renamed(config)
    # Report errors before filling defaults so an unknown key is not drowned by others.
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), _key_of(e)))
    if errors:
        raise LmforgeError(_message(errors[0]))
    _fill_defaults(config, schema)
    return config


def check_config(config: dict) -> dict:
    """Schema + defaults + every section's own rules (``lmforge.sections.SECTIONS``). Returns the completed config."""
    config = apply_schema(config)
    for key, section_class in SECTIONS.items():
        section_class.check_config(config, key)
    return config


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


def _branches(schema: dict) -> list[dict]:
    """The schema and the alternatives of its anyOf/oneOf."""
    return [schema, *schema.get("anyOf", []), *schema.get("oneOf", [])]


def _scalar_from_text(text: str, types: set[str]) -> Any:
    """``text`` as the first of the schema's types it spells, else ``text`` unchanged."""
    if "integer" in types:
        try:
            return int(text)
        except ValueError:
            pass
    if "number" in types:
        try:
            return float(text)
        except ValueError:
            pass
    if "boolean" in types and text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def coerce_strings(value: Any, schema: dict) -> Any:
    """``value`` with text turned into the integers, numbers, booleans and nulls its schema asks for.

    Snakemake reads ``--config 'eval={"samples_per_prompt": 0}'`` and ``--config 'seeds=[1, 2]'`` with
    YAML's base loader, which leaves every nested scalar a string ("0", "1"). "null" and "~"
    become None wherever the schema allows null; otherwise, where it allows a string the text
    stays as it is, and text that spells none of the allowed types stays too, so that
    validation names its key.
    """
    branches = _branches(schema)
    if isinstance(value, dict):
        shape = next((b for b in branches if "properties" in b or "additionalProperties" in b), {})
        props, extra = shape.get("properties", {}), shape.get("additionalProperties")
        return {k: coerce_strings(v, props.get(k, extra if isinstance(extra, dict) else {}))
                for k, v in value.items()}
    if isinstance(value, list):
        items = next((b["items"] for b in branches if isinstance(b.get("items"), dict)), {})
        return [coerce_strings(v, items) for v in value]
    if not isinstance(value, str):
        return value
    types = set()
    for b in branches:
        kind = b.get("type", [])
        types |= {kind} if isinstance(kind, str) else set(kind)
    if "null" in types and value.lower() in ("null", "~"):  # YAML's null, even where a string is allowed
        return None
    for member in (m for b in branches for m in b.get("enum", []) if not isinstance(m, str)):
        if value.lower() == ("null" if member is None else str(member).lower()):
            return member  # on_policy: [false, true, mixed] has no type, only its members
    return value if "string" in types else _scalar_from_text(value, types)
