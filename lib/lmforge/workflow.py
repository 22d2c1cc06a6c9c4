"""Glue between Snakemake (or the CLI) and the stage functions.

``StageEnv`` carries the execution settings a stage needs but whose change
should not make results stale (device, threads, tracking store, rule tags);
everything that does change results arrives as the stage's params.
"""
from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmforge.distributed import launch
from lmforge.errors import LmforgeError
from lmforge.pipeline import process_settings, stage_of_rule
from lmforge.tracking import StageRun


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
        return StageRun(self.stage, params=params, experiment=self.experiment, uri=self.tracking_uri,
                        enabled=self.tracking_enabled, tags=self.tags, inputs=inputs)

    @classmethod
    def from_config(cls, stage: str, config: dict, **kw) -> "StageEnv":
        tracking = config.get("tracking") or {}
        return cls(stage=stage, seed=config.get("seed", 1337), device=config.get("device", "auto"),
                   threads=config.get("threads"), experiment=config.get("experiment", "lmforge"),
                   tracking_uri=tracking.get("uri"), tracking_enabled=tracking.get("enabled", True), **kw)

    @classmethod
    def from_snakemake(cls, sm, stage: str | None = None) -> "StageEnv":
        tags = {"snakemake.rule": sm.rule, "snakemake.wildcards": str(dict(sm.wildcards.items()))}
        return cls.from_config(stage or sm.rule, sm.config, tags=tags, log_path=str(sm.log[0]) if sm.log else None,
                               ckpt_root=checkpoint_root(sm.output[0]) if sm.output else "results/.checkpoints")


def checkpoint_root(output: str) -> str:
    """results/.checkpoints beside the results/ folder an output lies in: a seed's pipeline
    (results/seeds/<seed>/results/...) resumes from its own checkpoints, never another seed's."""
    head, sep, _ = str(output).rpartition("results/")
    return f"{head}results/.checkpoints" if sep else "results/.checkpoints"


def run_script(sm, body: Callable[["StageEnv"], object], stage: str | None = None) -> None:
    """Entry point of every workflow script: log to the rule's log, one-line errors, exit 1 on failure."""
    env = StageEnv.from_snakemake(sm, stage)
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


def run_rule(sm) -> None:
    """The script of every stage rule: run the rule's stage on its params, inputs and outputs, in this
    process or under torchrun (``distributed.nproc``)."""
    stage = stage_of_rule(sm.rule)
    run_script(sm, lambda env: launch(stage, dict(sm.params.items()), dict(sm.input.items()),
                                      dict(sm.output.items()), env, **process_settings(sm.config, stage)),
               stage=stage)
