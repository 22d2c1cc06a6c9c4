"""Glue between Snakemake (or the CLI) and the stage functions.

``StageEnv`` carries the execution settings a stage needs but whose change
should not make results stale (device, threads, tracking store, rule tags);
everything that does change results arrives as the stage's params.
"""
from __future__ import annotations

import hashlib
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmforge.errors import LmforgeError

LIB_ROOT = Path(__file__).resolve().parent


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

    Snakemake reads ``--config 'eval={"pass_k": 0}'`` and ``--config 'seeds=[1, 2]'`` with
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


def code_version(*relpaths: str) -> str:
    """Hash of library source files (or folders) a stage depends on, for a Snakemake param.

    Snakemake only sees a ``script:``'s own mtime; passing this as a param makes
    edits to the library code a stage runs visible as a params change.
    """
    h = hashlib.sha256()
    for rel in relpaths:
        p = LIB_ROOT / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(LIB_ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class StageEnv:
    stage: str
    seed: int = 1337
    device: str = "auto"
    threads: int | None = None
    experiment: str = "lmforge"
    tracking_uri: str | None = None
    tracking_enabled: bool = True
    tags: dict = field(default_factory=dict)
    log_path: str | None = None
    ckpt_root: str = "results/.checkpoints"

    @property
    def ckpt_dir(self) -> Path:
        # Outside every rule's outputs: Snakemake deletes incomplete outputs, never this.
        return Path(self.ckpt_root) / self.stage

    def tracker(self, params: dict, inputs: dict):
        from lmforge.tracking import StageRun

        return StageRun(self.stage, params=params, experiment=self.experiment, uri=self.tracking_uri,
                        enabled=self.tracking_enabled, tags=self.tags, inputs=inputs)

    @classmethod
    def from_config(cls, stage: str, config: dict, **kw) -> "StageEnv":
        tracking = config.get("tracking") or {}
        return cls(stage=stage, seed=config.get("seed", 1337), device=config.get("device", "auto"),
                   threads=config.get("threads"), experiment=config.get("experiment", "lmforge"),
                   tracking_uri=tracking.get("uri"), tracking_enabled=tracking.get("enabled", True), **kw)

    @classmethod
    def from_snakemake(cls, sm) -> "StageEnv":
        tags = {"snakemake.rule": sm.rule, "snakemake.wildcards": str(dict(sm.wildcards.items()))}
        return cls.from_config(sm.rule, sm.config, tags=tags, log_path=str(sm.log[0]) if sm.log else None,
                               ckpt_root=checkpoint_root(sm.output[0]) if sm.output else "results/.checkpoints")


def checkpoint_root(output: str) -> str:
    """results/.checkpoints beside the results/ folder an output lies in: a seed's pipeline
    (results/seeds/<seed>/results/...) resumes from its own checkpoints, never another seed's."""
    head, sep, _ = str(output).rpartition("results/")
    return f"{head}results/.checkpoints" if sep else "results/.checkpoints"


def run_script(sm, body: Callable[["StageEnv"], object]) -> None:
    """Entry point of every workflow script: log to the rule's log, one-line errors, exit 1 on failure."""
    env = StageEnv.from_snakemake(sm)
    terminal = sys.stderr
    log = open(env.log_path, "a", buffering=1) if env.log_path else None
    if log is not None:
        sys.stdout = sys.stderr = log
    try:
        body(env)
    except LmforgeError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        if log is not None:
            print(f"ERROR in rule {sm.rule}: {e}", file=terminal)
        sys.exit(1)
    except Exception:
        traceback.print_exc()
        if log is not None:
            print(f"ERROR in rule {sm.rule}: unexpected failure, see {env.log_path}", file=terminal)
        sys.exit(1)
    finally:
        if log is not None:
            sys.stdout, sys.stderr = sys.__stdout__, terminal
            log.close()


def config_sections(config: dict) -> Callable[..., dict]:
    """``section("model", "pretrain")`` → those config sections plus the seed: a rule's params."""
    return lambda *names: {**{n: config[n] for n in names}, "seed": config["seed"]}


REWARD_MODEL = "results/reward/model.pt"
SCORED_PAIRS = "results/scored/pairs.jsonl"


def optional_inputs(config: dict, stage: str) -> dict:
    """Inputs a stage has only when its config asks for them: a reference model, a data file,
    the reward model (reward_fn.rm > 0), the on-policy pairs (dpo.on_policy). Used by the rules and the CLI."""
    cfg = config[stage]
    inputs = {}
    # A user's files are absolute: a seed's copy of the pipeline prefixes relative paths with its folder.
    if cfg.get("reference"):
        inputs["reference"] = os.path.abspath(cfg["reference"])
    from lmforge.data.sources import data_file

    local = data_file(cfg.get("data"), f"{stage}.data")  # None for hub data: not a file input
    if local:
        inputs["data"] = os.path.abspath(local)
    if (cfg.get("reward_fn") or {}).get("rm", 0) > 0:
        inputs["reward_model"] = REWARD_MODEL
    if cfg.get("on_policy"):
        inputs["pairs"] = SCORED_PAIRS
    return inputs
