"""The sft and reward rules end to end on the tiny config: outputs, metrics, lineage, staleness."""
import json
import math

import pytest
import torch

from lmforge.loader import load_model
from test_workflow import TINY, executed, snakemake, write_config

pytestmark = pytest.mark.integration
TARGET = "results/reward/model.pt"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("wf_sft")
    write_config(workdir)
    first = snakemake(workdir, target=TARGET)
    return workdir, first


def test_first_run_builds_the_chain(built):
    workdir, first = built
    assert executed(first) == {"tokenizer", "tokenize", "pretrain", "sft", "reward"}
    for stage in ("sft", "reward"):
        assert (workdir / f"results/logs/{stage}.log").exists()


def test_sft_outputs(built):
    workdir, _ = built
    m = json.loads((workdir / "results/sft/metrics.json").read_text())
    assert m["steps"] == TINY["sft"]["max_steps"]
    assert math.isfinite(m["val_loss"]) and 0 < m["val_loss"] < 10
    assert m["n_truncated"] >= 0 and m["wall_s"] > 0 and m["tokens_per_s"] > 0
    assert m["mlflow_run_id"]
    assert len(m["samples"]) == 5 and all(isinstance(s["response"], str) for s in m["samples"])
    for which in ("pretrained", "sft"):
        assert 0 <= m["heldout"][which]["accuracy"] <= 1
        assert 0 <= m["heldout"][which]["dismissive_rate"] <= 1
    assert m["heldout"]["n"] + m["heldout"]["n_skipped"] == TINY["data"]["builtin"]["n_val"]
    assert m["heldout"]["n"] >= 5
    model, tok, ckpt = load_model(workdir / "results/sft/model.pt")
    assert ckpt["kind"] == "causal_lm" and ckpt["meta"]["stage"] == "sft"
    # Initialised from pretrain and trained a few steps: close to, but not equal to, the pretrained weights.
    pre, _, _ = load_model(workdir / "results/pretrain/model.pt")
    diffs = [(a - b).abs().max().item() for a, b in zip(model.state_dict().values(), pre.state_dict().values())]
    assert max(diffs) > 0


def test_reward_outputs(built):
    workdir, _ = built
    m = json.loads((workdir / "results/reward/metrics.json").read_text())
    assert m["steps"] == TINY["reward"]["max_steps"]
    assert m["n_val"] + m["n_val_skipped"] == TINY["data"]["builtin"]["n_val"] and m["n_val"] >= 5
    assert 0 <= m["val_accuracy"] <= 1 and math.isfinite(m["val_margin"]) and m["val_reward_std"] >= 0
    rm, tok, ckpt = load_model(workdir / "results/reward/model.pt", kind="reward_model")
    assert ckpt["kind"] == "reward_model"
    # The trunk is the SFT model's architecture (its weights were the starting point).
    sft, _, _ = load_model(workdir / "results/sft/model.pt")
    assert rm.trunk.state_dict().keys() == sft.state_dict().keys()
    # Recompute the held-out accuracy from the saved model and compare with metrics.json.
    from lmforge.data.builtin import make_task_data
    from lmforge.data.formats import load_preferences
    from lmforge.train.reward import encode_pairs

    data = make_task_data(TINY["data"]["builtin"], TINY["seed"])
    seq = rm.trunk.cfg.max_seq_len
    fit = [p for p in load_preferences(data["pref_val"]) if len(tok.render_prompt(p["prompt"])) < seq]
    pairs = encode_pairs(tok, fit, seq)
    assert len(pairs) == m["n_val"]
    rm.eval()
    with torch.no_grad():
        wins = [rm(torch.tensor([p.chosen])).item() > rm(torch.tensor([p.rejected])).item() for p in pairs]
    assert sum(wins) / len(wins) == pytest.approx(m["val_accuracy"], abs=1.5 / len(wins))


def test_mlflow_lineage_reward_from_sft(built):
    from mlflow.tracking import MlflowClient

    workdir, _ = built
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'results/mlflow.db'}")
    sft_id = json.loads((workdir / "results/sft/metrics.json").read_text())["mlflow_run_id"]
    rew_id = json.loads((workdir / "results/reward/metrics.json").read_text())["mlflow_run_id"]
    pre_id = json.loads((workdir / "results/pretrain/metrics.json").read_text())["mlflow_run_id"]
    assert client.get_run(sft_id).data.tags["lineage.model.run_id"] == pre_id
    assert client.get_run(rew_id).data.tags["lineage.model.run_id"] == sft_id
    artifacts = {a.path for a in client.list_artifacts(sft_id, "samples")}
    assert len(artifacts) == 2  # evaluations at steps 3 and 6


def test_changing_sft_lr_reruns_exactly_sft_and_reward(built):
    workdir, _ = built
    write_config(workdir, **{"sft.lr": 1e-4})
    assert executed(snakemake(workdir, target=TARGET)) == {"sft", "reward"}
    assert executed(snakemake(workdir, target=TARGET)) == set()
