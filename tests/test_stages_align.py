"""The whole DAG on the tiny config: every stage's artifacts, the report, and dpo.beta staleness."""
import json

import pandas as pd
import pytest

from lmforge.loader import read_checkpoint
from test_workflow import executed, snakemake, write_config

pytestmark = pytest.mark.integration
ALL = {"tokenizer", "tokenize", "pretrain", "sft", "reward", "score", "dpo", "ppo", "grpo", "star", "evaluate", "all"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("wf_all")
    write_config(workdir)
    first = snakemake(workdir, target="all")
    return workdir, first


def test_all_builds_every_stage(built):
    workdir, first = built
    assert executed(first) == ALL
    for stage in ("dpo", "ppo", "grpo", "star"):
        ckpt = read_checkpoint(workdir / f"results/{stage}/model.pt")
        assert ckpt["kind"] == "causal_lm" and ckpt["meta"]["stage"] == stage
        assert json.loads((workdir / f"results/{stage}/metrics.json").read_text())["mlflow_run_id"]


def test_scored_outputs(built):
    workdir, _ = built
    table = pd.read_parquet(workdir / "results/scored/samples.parquet")
    for column in ("prompt_id", "prompt", "response", "rm_score", "correct", "reward", "logprob", "length"):
        assert column in table.columns
    summary = json.loads((workdir / "results/scored/summary.json").read_text())
    assert summary["reward_mean"] == pytest.approx(table["reward"].mean())


def test_report_covers_every_stage(built):
    workdir, _ = built
    table = pd.read_csv(workdir / "results/eval/metrics.csv")
    assert list(table["stage"]) == ["pretrain", "sft", "dpo", "ppo", "grpo", "star"]
    report = (workdir / "results/eval/report.md").read_text()
    for stage in ("pretrain", "sft", "dpo", "ppo", "grpo", "star"):
        assert f"| {stage} " in report


def test_changing_dpo_beta_reruns_exactly_dpo_and_evaluate(built):
    workdir, _ = built
    write_config(workdir, **{"dpo.beta": 0.3})
    proc = snakemake(workdir, target="all")
    assert executed(proc) == {"dpo", "evaluate", "all"}
    assert executed(snakemake(workdir, target="all")) == set()
