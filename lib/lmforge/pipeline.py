"""The pipeline, declared once: each stage's config sections, input files and output files.

The Snakemake rules (``workflow/rules/stages.smk``) and ``lmforge run`` are both built
from :data:`STAGES`, so the two cannot drift apart. A stage's params are everything
its result depends on — its config sections, the seed, the part of ``data`` it reads,
and the version of the code it runs — in canonical form (keys sorted at every level),
so Snakemake reruns a stage exactly when a value it reads changes, never because a
config's keys were reordered. The code version is the hash of the stage module's
import closure (:mod:`lmforge.imports`), read from the sources without importing
torch, so building the DAG stays fast.

The same pipeline runs once more per entry of ``seeds:``, every path under
``results/seeds/<seed>/``: :func:`instances` lists the copies.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.sources import data_file
from lmforge.errors import LmforgeError
from lmforge.imports import code_version

# The pretraining corpus depends on these data keys only (not on data.builtin's task knobs).
CORPUS_KEYS = ("sources", "val_fraction", "max_docs")
# What a stage process loads besides its stage module: the rule's entry point and the torchrun launcher.
LAUNCHER = ("lmforge.workflow", "lmforge.distributed")


@dataclass(frozen=True)
class Stage:
    name: str
    """The rule's name and ``lmforge.stages.<name>``, the module whose ``run()`` does the work."""
    sections: tuple[str, ...]
    """Config sections that reach the stage whole, as params."""
    inputs: dict[str, str]
    """Files the stage always reads: name -> path under results/."""
    outputs: dict[str, str]
    """Files the stage writes: name -> path under results/."""
    data: str | None = None
    """The part of the ``data`` section it reads: "corpus" (the pretraining text) or "builtin" (the task data)."""
    multi_process: bool = False
    """Whether it can train under torchrun (``distributed.nproc``)."""
    init_from: tuple[str, ...] = ()
    """Files of a local ``model.init_from`` folder it reads: "config", "tokenizer", "weights"."""

    @property
    def module(self) -> str:
        return f"lmforge.stages.{self.name}"


def _trained(stage: str, base: str, *, multi_process: bool = False, base_name: str = "policy") -> Stage:
    """A stage that trains the model of stage ``base`` on the task data and publishes model + metrics."""
    return Stage(stage, (stage,), {base_name: f"results/{base}/model.pt"},
                 {"model": f"results/{stage}/model.pt", "metrics": f"results/{stage}/metrics.json"},
                 data="builtin", multi_process=multi_process)


EVALUATED = ("pretrain", "sft", "dpo", "ppo", "grpo", "star")  # the stages eval.stages may name

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("tokenizer", ("tokenizer",), {},
          {"tokenizer": "results/tokenizer/tokenizer.json", "config": "results/tokenizer/tokenizer_config.json",
           "stats": "results/tokenizer/stats.json"},
          data="corpus", init_from=("tokenizer",)),
    Stage("tokenize", (), {"tokenizer": "results/tokenizer/tokenizer.json"},
          {"train": "results/data/pretrain/train.bin", "val": "results/data/pretrain/val.bin",
           "meta": "results/data/pretrain/meta.json"},
          data="corpus"),
    Stage("pretrain", ("model", "pretrain"),
          {"tokenizer": "results/tokenizer/tokenizer.json", "train": "results/data/pretrain/train.bin",
           "val": "results/data/pretrain/val.bin", "meta": "results/data/pretrain/meta.json"},
          {"model": "results/pretrain/model.pt", "metrics": "results/pretrain/metrics.json"},
          multi_process=True, init_from=("config", "weights")),
    _trained("sft", "pretrain", multi_process=True, base_name="model"),
    _trained("reward", "sft", base_name="model"),
    Stage("score", ("score",), {"policy": "results/sft/model.pt"},
          {"samples": "results/scored/samples.parquet", "summary": "results/scored/summary.json",
           "pairs": "results/scored/pairs.jsonl"},
          data="builtin"),
    _trained("dpo", "sft", multi_process=True),
    _trained("ppo", "sft"),
    _trained("grpo", "sft"),
    _trained("star", "sft"),
    Stage("evaluate", ("eval",),
          {"reward_model": "results/reward/model.pt", "val": "results/data/pretrain/val.bin",
           "meta": "results/data/pretrain/meta.json"},
          {"metrics": "results/eval/metrics.csv", "summary": "results/eval/summary.json",
           "report": "results/eval/report.md"},
          data="builtin"),
)}

# What `snakemake all` builds.
FINAL_OUTPUTS = ("results/pretrain/model.pt", "results/sft/model.pt", "results/reward/model.pt",
                 "results/scored/summary.json", "results/dpo/model.pt", "results/ppo/model.pt",
                 "results/grpo/model.pt", "results/star/model.pt", "results/eval/report.md")


def canonical(value: Any) -> Any:
    """``value`` with every mapping's keys sorted, recursively: equal configs give equal params."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def stage_code_version(name: str) -> str:
    """The version of the code a stage runs: its module's import closure plus the launcher's."""
    return code_version(STAGES[name].module, *LAUNCHER)


def stage_params(name: str, config: dict) -> dict:
    """Everything a stage's result depends on, canonical: its sections, the seed, its data, its code."""
    stage = STAGES[name]
    params = {s: config[s] for s in stage.sections}
    params["seed"] = config["seed"]
    if stage.data == "corpus":
        params["data"] = {k: config["data"][k] for k in CORPUS_KEYS}
    elif stage.data == "builtin":
        params["data"] = {"builtin": config["data"]["builtin"]}
    if name == "tokenizer":  # an imported model brings its own tokenizer
        params["init_from"] = config["model"]["init_from"]
    params["code"] = stage_code_version(name)
    return canonical(params)


def init_from_files(init_from: str | None, *names: str) -> dict[str, str]:
    """The files of a local ``model.init_from`` folder a stage reads ({init_from_<name>: abs path}), so that
    replacing the folder's weights or tokenizer reruns what was built from them. ``names``: "config",
    "tokenizer", "weights" (the safetensors file, or the index of a sharded one): Hugging Face's file names.
    A hub id has no local files before it is fetched: {} (its staleness is its id, a param)."""
    if not init_from:
        return {}
    folder = Path(init_from.removeprefix("hf:")).expanduser()
    if not folder.is_dir():
        return {}
    weights, index = "model.safetensors", "model.safetensors.index.json"
    files = {"config": "config.json", "tokenizer": "tokenizer.json",
             "weights": weights if (folder / weights).exists() or not (folder / index).exists() else index}
    return {f"init_from_{n}": str((folder / files[n]).resolve()) for n in names}


def _under(prefix: str, paths: dict[str, str]) -> dict[str, str]:
    return {k: prefix + v for k, v in paths.items()}


def stage_outputs(name: str, prefix: str = "") -> dict[str, str]:
    return _under(prefix, STAGES[name].outputs)


def stage_inputs(name: str, config: dict, prefix: str = "") -> dict[str, str]:
    """The files a stage reads under this config: its fixed inputs, the models ``eval.stages`` names,
    and what its section asks for (a reference model, a data file, the reward model, scored pairs).
    A user's own files are absolute paths; pipeline files sit under ``prefix``."""
    stage = STAGES[name]
    inputs = _under(prefix, stage.inputs)
    if name == "evaluate":
        inputs = {**{f"model_{s}": f"{prefix}results/{s}/model.pt" for s in config["eval"]["stages"]}, **inputs}
    inputs.update(init_from_files(config["model"]["init_from"], *stage.init_from))
    key = stage.sections[-1] if stage.sections else name  # the stage's own section
    section = config.get(key) or {}
    if section.get("reference"):
        inputs["reference"] = os.path.abspath(section["reference"])
    if local := data_file(section.get("data"), f"{key}.data"):  # None for hub data: a param
        inputs["data"] = os.path.abspath(local)
    if (section.get("reward_fn") or {}).get("rm", 0) > 0:
        inputs["reward_model"] = f"{prefix}results/reward/model.pt"
    if section.get("on_policy"):
        inputs["pairs"] = f"{prefix}results/scored/pairs.jsonl"
    return inputs


def log_path(name: str, prefix: str = "") -> str:
    return f"{prefix}results/logs/{name}.log"


def process_settings(config: dict, name: str) -> dict:
    """``nproc`` and ``strategy`` of a stage, from the config (execution settings, never params).

    nproc: ``distributed.nproc`` (a number, or a mapping stage -> number), else the rule's GPU count
    (``resources.<stage>.gpu``, else ``resources.default.gpu``), else 1; always 1 for a stage that
    cannot train under torchrun.
    """
    section = config.get("distributed") or {}
    strategy = section.get("strategy", "ddp")
    if name not in STAGES or not STAGES[name].multi_process:
        return {"nproc": 1, "strategy": strategy}
    nproc = section.get("nproc")
    if isinstance(nproc, dict):
        nproc = nproc.get(name)
    if nproc is None:
        resources = config.get("resources") or {}
        nproc = {**(resources.get("default") or {}), **(resources.get(name) or {})}.get("gpu") or 1
    if not isinstance(nproc, int) or nproc < 1:
        raise LmforgeError(f"config key 'distributed.nproc': {nproc!r} is not a positive number of processes")
    return {"nproc": nproc, "strategy": strategy}


def seed_prefix(seed: int) -> str:
    return f"results/seeds/{seed}/"


def instances(config: dict) -> list[tuple[str, str, dict]]:
    """(rule name prefix, path prefix, config) of each copy of the pipeline: the plain one under
    results/, and one per entry of ``seeds:`` with that seed, under results/seeds/<seed>/."""
    copies = [("", "", config)]
    for seed in config.get("seeds") or []:
        copies.append((f"seed{seed}_", seed_prefix(seed), {**config, "seed": seed, "seeds": []}))
    return copies


def stage_of_rule(rule: str) -> str:
    """The stage a rule runs: ``dpo`` for the rules ``dpo`` and ``seed7_dpo``."""
    name = rule.rpartition("_")[2]
    if name not in STAGES:
        raise LmforgeError(f"rule '{rule}' runs no lmforge stage")
    return name
