"""Several seeds: the pipeline once per seed as a Snakemake module, and mean ± std of the evaluation."""

import json

import pandas as pd
import pytest

from lmforge.errors import LmforgeError
from lmforge.report import render_seed_summary, seed_summary, write_seed_summary
from test_workflow import executed, snakemake, write_config


def write_metrics(path, rows: dict[str, dict]):
    pd.DataFrame(rows).T.rename_axis("stage").to_csv(path)
    return path


def test_summary_is_the_mean_and_sample_std_of_each_metric(tmp_path):
    tables = {
        1: write_metrics(tmp_path / "1.csv", {"sft": {"accuracy": 0.1, "win_rate": 0.5},
                                             "dpo": {"accuracy": 0.2, "win_rate": 0.6}}),
        2: write_metrics(tmp_path / "2.csv", {"sft": {"accuracy": 0.3, "win_rate": 0.5},
                                             "dpo": {"accuracy": 0.4, "win_rate": 0.8}}),
        7: write_metrics(tmp_path / "7.csv", {"sft": {"accuracy": 0.2, "win_rate": 0.5},
                                             "dpo": {"accuracy": 0.9, "win_rate": None}}),
    }
    s = seed_summary(tables)
    assert list(s.index.unique("stage")) == ["sft", "dpo"]
    assert s.loc[("sft", "accuracy"), "mean"] == pytest.approx(0.2)
    assert s.loc[("sft", "accuracy"), "std"] == pytest.approx(0.1)  # sample std of 0.1, 0.3, 0.2
    assert s.loc[("sft", "win_rate"), "std"] == 0
    # A metric missing for one seed is averaged over the seeds that have it, and says so in n.
    assert s.loc[("dpo", "win_rate"), "n"] == 2 and s.loc[("dpo", "win_rate"), "mean"] == pytest.approx(0.7)
    assert list(s.loc[("dpo", "accuracy"), ["seed_1", "seed_2", "seed_7"]]) == [0.2, 0.4, 0.9]
    md = render_seed_summary(s)
    assert "seeds 1, 2, 7" in md and "| sft " in md and "0.2 ± 0.1" in md

    write_seed_summary(tables, tmp_path / "s.csv", tmp_path / "s.md")
    back = pd.read_csv(tmp_path / "s.csv", index_col=["stage", "metric"])
    assert back.loc[("dpo", "accuracy"), "mean"] == pytest.approx(0.5)


def test_no_seeds_or_a_broken_table_is_a_clear_error(tmp_path):
    with pytest.raises(LmforgeError, match=r"config key 'seeds' is empty"):
        seed_summary({})
    bad = tmp_path / "metrics.csv"
    bad.write_text("no stage column\n1\n")
    with pytest.raises(LmforgeError, match=rf"{bad}: not an evaluation metrics.csv"):
        seed_summary({1: bad})


@pytest.mark.integration
def test_the_pipeline_runs_once_per_seed_and_is_summarized(tmp_path):
    write_config(tmp_path, seeds=[3, 4], **{"eval.stages": ["pretrain", "sft"]})
    proc = snakemake(tmp_path, "--cores", "2", target="results/seeds/summary.md")
    ran = executed(proc)
    assert {"seed3_pretrain", "seed4_pretrain", "seed3_evaluate", "seed4_evaluate", "seeds_summary"} <= ran
    assert not any(r in ran for r in ("pretrain", "evaluate"))  # the single-seed pipeline is not needed
    per_seed = {}
    for seed in (3, 4):
        root = tmp_path / f"results/seeds/{seed}/results"
        metrics = json.loads((root / "pretrain/metrics.json").read_text())
        per_seed[seed] = pd.read_csv(root / "eval/metrics.csv", index_col="stage")
        assert metrics["steps"] == 12 and (root / "logs/pretrain.log").exists()
    # Different seeds, different initialisations: the pretrained models differ.
    assert per_seed[3].loc["pretrain", "val_loss"] != per_seed[4].loc["pretrain", "val_loss"]
    summary = pd.read_csv(tmp_path / "results/seeds/summary.csv", index_col=["stage", "metric"])
    row = summary.loc[("pretrain", "val_loss")]
    assert row["seed_3"] == pytest.approx(per_seed[3].loc["pretrain", "val_loss"])
    assert row["mean"] == pytest.approx((per_seed[3].loc["pretrain", "val_loss"]
                                         + per_seed[4].loc["pretrain", "val_loss"]) / 2)
    assert "± " in (tmp_path / "results/seeds/summary.md").read_text()
    # Nothing is stale afterwards.
    again = snakemake(tmp_path, "--cores", "2", target="results/seeds/summary.md")
    assert executed(again) == set()
