"""Evaluation measures (win rate, KL, rates, accuracy) and the evaluate stage's files, on tiny models."""
import itertools
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import save_model
from lmforge.errors import LmforgeError
from lmforge.data.prompts import fitting_prompts
from lmforge.evaluate import (evaluate_model, greedy_responses, kl_estimate, pass_at_k, response_metrics,
                              sampled_accuracy, win_rate)
from lmforge.generate import generate
from lmforge.model import ModelConfig, RewardModel, Transformer
from lmforge.report import COLUMNS
from lmforge.stages import evaluate as stage
from lmforge.tasks import extract_answer
from lmforge.tokenizer import LMTokenizer
from lmforge.train.lm import TokenWindows
from lmforge.workflow import StageEnv

TEXT = ("What is 37 + 48? 37 + 48 = 85. Reverse the word 'apple'. The reverse of 'apple' is 'elppa'. "
        "Write 'garden' in capital letters. Sort the letters of 'pickle' alphabetically. I don't know. ")
BUILTIN = {"n_sft": 4, "n_pref": 4, "n_rl": 4, "n_val": 8, "tasks": {"arithmetic": 1.0, "string": 1.0, "docstring": 0}}
SEQ = 48


@pytest.fixture(scope="module")
def tok():
    return LMTokenizer.train([TEXT * 3, TEXT.lower(), TEXT.upper()] * 20, vocab_size=320)


def tiny_model(tok, seed=0, scale=1.0) -> Transformer:
    """d_model 32, 2 layers; ``scale`` multiplies the output head: large values give peaked predictions.

    Untied: a random model with tied embeddings mostly predicts its last input token (``<|assistant|>``),
    whose text is empty; an untied random head answers with text.
    """
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=SEQ, tie_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second thread only adds contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def zero_scorer(records, responses):
    return [0.0] * len(responses)


# --------------------------------------------------------------------------- the measures


def test_win_rate_counts_ties_half():
    scores = [1.0, 0.5, 2.0, 0.3, 1.0, 4.0]
    base = [0.5, 0.5 + 5e-7, 3.0, 0.3, 0.0, 1.0]
    texts = ["a", "b", "c", "d", "same", "f"]
    base_texts = ["x", "y", "z", "w", "same", "v"]
    # win, tie (|diff| < 1e-6), loss, tie (equal), tie (identical text despite the scores), win
    assert win_rate(scores, base, texts, base_texts) == {"win_rate": (2 + 3 / 2) / 6, "wins": 2, "ties": 3,
                                                         "losses": 1}
    # Without the texts the fifth prompt is decided by its score: a win.
    assert win_rate(scores, base) == {"win_rate": (3 + 2 / 2) / 6, "wins": 3, "ties": 2, "losses": 1}
    assert win_rate([], [])["win_rate"] is None
    with pytest.raises(ValueError, match="2 scores but 1"):
        win_rate([1.0, 2.0], [1.0])


def reference_kl(policy, ref, tok, prompts, max_new_tokens, seed) -> float:
    """The same samples (same seed), each scored alone by a plain forward pass of each model."""
    ids = [tok.prompt_ids(p) for p in prompts]
    samples = generate(policy, ids, max_new_tokens=max_new_tokens, temperature=1.0, stop_ids=(tok.end_id,),
                       pad_id=tok.pad_id, generator=torch.Generator().manual_seed(seed), batch_size=3).tokens
    total = 0.0
    for p, r in zip(ids, samples):
        row = torch.tensor([p + r])
        for model, sign in ((policy, 1.0), (ref, -1.0)):
            logp = F.log_softmax(model(row)[0, :-1].double(), -1)
            total += sign * sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(r))
    return total / len(prompts)


def test_kl_estimate_zero_for_itself_positive_for_another_model(tok):
    prompts = ["What is 37 + 48?", "Reverse the word 'apple'.", "Write 'garden' in capital letters.",
               "I don't know.", "Sort the letters of 'pickle' alphabetically."]
    policy, other = tiny_model(tok, seed=0), tiny_model(tok, seed=1, scale=30.0)
    kw = dict(max_new_tokens=6, seed=7, batch_size=3)
    assert kl_estimate(policy, policy, tok, prompts, **kw) == 0.0
    kl = kl_estimate(policy, other, tok, prompts, **kw)
    assert kl > 1.0  # a near-uniform policy against a sharply peaked model
    assert kl == pytest.approx(reference_kl(policy, other, tok, prompts, 6, 7), rel=1e-4)
    # The estimate is on the policy's samples: swapping the models changes it.
    assert kl_estimate(other, policy, tok, prompts, **kw) != pytest.approx(kl)


def test_response_metrics_rates_on_hand_made_answers():
    records = [{"prompt": "What is 37 + 48?", "answer": "85", "task": "arithmetic"},
               {"prompt": "What is 2 + 2?", "answer": "4", "task": "arithmetic"},
               {"prompt": "Reverse the word 'apple'.", "answer": "elppa", "task": "string"},
               {"prompt": "Reverse the word 'stone'.", "answer": "enots", "task": "string"},
               {"prompt": "What is 1 + 1?", "answer": "2", "task": "arithmetic"}]
    responses = ["37 + 48 = 85.",                                  # correct
                 "I don't know, look it up.",                      # dismissive
                 "The reverse of 'apple' is 'elppa'.",             # correct
                 "the word the word the word the word the word",   # repetitive
                 ""]                                               # empty: dismissive, wrong
    assert response_metrics(records, responses) == {"accuracy": 2 / 5, "accuracy/arithmetic": 1 / 3,
                                                    "accuracy/string": 1 / 2, "dismissive_rate": 2 / 5,
                                                    "repetitive_rate": 1 / 5}


def test_accuracy_of_a_model_on_prompts(tok, tmp_path):
    model = tiny_model(tok, seed=3)
    words = ["apple", "stone", "river", "cloud", "seven", "table", "bright", "garden"]
    records = [{"prompt": f"Reverse the word '{w}'.", "task": "string"} for w in words]
    long = {"prompt": "Reverse the word " + "'apple' " * 40, "task": "string", "answer": "x"}
    kept = fitting_prompts(records[:4] + [long] + records[4:], tok, SEQ)
    assert [r["prompt"] for r in kept] == [r["prompt"] for r in records]  # the long prompt is left out
    # Make the model right on the even prompts (its own answer is the reference) and wrong on the odd ones.
    greedy = greedy_responses(model, tok, [r["prompt"] for r in records], max_new_tokens=6)
    for i, (r, g) in enumerate(zip(records, greedy)):
        r["answer"] = (extract_answer(g, "string") or "@@") if i % 2 == 0 else "not-the-answer"
    expected = sum(i % 2 == 0 and extract_answer(g, "string") is not None for i, g in enumerate(greedy))
    np.array(tok.encode(TEXT * 4), dtype=np.uint16).tofile(tmp_path / "val.bin")
    windows = TokenWindows(tmp_path / "val.bin", "uint16", SEQ, batch_size=4, seed=0, device="cpu")
    metrics, answers = evaluate_model(model, tok, kept, zero_scorer, val_windows=windows, val_batches=2,
                                      bytes_per_token=3.0, max_new_tokens=6, seed=0, batch_size=3)
    assert answers.responses == greedy
    ids = generate(model, [tok.prompt_ids(r["prompt"]) for r in records], max_new_tokens=6, temperature=0.0,
                   stop_ids=(tok.end_id,), pad_id=tok.pad_id).tokens
    assert answers.lengths == [len([t for t in x if t != tok.end_id]) for x in ids]
    assert metrics["response_tokens"] == sum(answers.lengths) / len(records)
    assert metrics["accuracy"] == expected / len(records) and expected >= 3
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["val_bpb"] == pytest.approx(metrics["val_loss"] / math.log(2) / 3.0)
    assert metrics["win_rate"] is None and metrics["kl_to_sft"] is None and metrics["rm_score"] == 0.0


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample():
    for n in range(1, 7):
        for c in range(n + 1):
            labels = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(labels, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(x) for x in subsets) / len(subsets)), (n, c, k)
    assert pass_at_k(8, 2, 1) == 0.25  # pass@1 is the share of correct samples
    for bad in ((4, 5, 1), (4, 1, 0), (4, 1, 5)):
        with pytest.raises(ValueError, match="pass_at_k needs"):
            pass_at_k(*bad)


def test_sampled_accuracy_counts_each_prompts_own_samples(tok):
    model = tiny_model(tok, seed=0, scale=10.0)  # peaked: some prompts repeat an answer
    words = ["apple", "stone", "river", "cloud", "seven"]
    records = [{"prompt": f"Reverse the word '{w}'.", "task": "string"} for w in words]
    records[-1]["task"] = "arithmetic"  # its answer below is no number: never right
    k = 4
    # The samples sampled_accuracy draws: a prompt's k samples side by side, one seeded generator.
    ids = [tok.prompt_ids(r["prompt"]) for r in records for _ in range(k)]
    out = generate(model, ids, max_new_tokens=5, temperature=1.0, stop_ids=(tok.end_id,), pad_id=tok.pad_id,
                   generator=torch.Generator().manual_seed(11), batch_size=3).tokens
    answers = [extract_answer(tok.decode([t for t in x if t != tok.end_id]), "string") for x in out]
    # A prompt's reference answer is its samples' most frequent one; the last prompt's is one no sample gives.
    for i, r in enumerate(records):
        mine = [a for a in answers[i * k:(i + 1) * k] if a is not None]
        r["answer"] = max(mine, key=mine.count) if i < 4 and mine else "not-the-answer"
    correct = [sum(a == r["answer"] for a in answers[i * k:(i + 1) * k]) for i, r in enumerate(records)]
    assert correct[-1] == 0 and all(c >= 1 for c in correct[:4]) and sum(correct) > 4
    got = sampled_accuracy(model, tok, records, k=k, max_new_tokens=5, seed=11, batch_size=3)
    assert got == {"accuracy_sampled": pytest.approx(sum(correct) / (k * len(records))), "pass_at_k": 4 / 5,
                   "pass_at_k/arithmetic": 0.0, "pass_at_k/string": 1.0}


# --------------------------------------------------------------------------- the stage


def save(path, model, tok, kind="causal_lm", history=None):
    save_model(path, model, kind=kind, model_config=(model.trunk if kind == "reward_model" else model).cfg.to_dict(),
               tokenizer=tok, meta={"stage": path.parent.name})
    if history is not None:
        (path.parent / "metrics.json").write_text(json.dumps({"history": history}))
    return str(path)


@pytest.fixture(scope="module")
def pipeline(tok, tmp_path_factory):
    """Checkpoints of three causal LMs, a reward model, val tokens and their meta, as the rules lay them out."""
    root = tmp_path_factory.mktemp("results")
    for d in ("pretrain", "sft", "dpo", "reward", "data"):
        (root / d).mkdir()
    val = root / "data" / "val.bin"
    np.array(tok.encode(TEXT * 6), dtype=np.uint16).tofile(val)
    (root / "data" / "meta.json").write_text(json.dumps({"dtype": "uint16", "val_bytes_per_token": 3.5,
                                                         "tokenizer_sha256": tok.sha256}))
    curve = [{"step": 10, "val_loss": 3.0, "val_ppl": 20.1}, {"step": 20, "val_loss": 2.5, "val_ppl": 12.2}]
    return {
        "model_pretrain": save(root / "pretrain" / "model.pt", tiny_model(tok, 0), tok, history=curve),
        "model_sft": save(root / "sft" / "model.pt", tiny_model(tok, 1, scale=5.0), tok, history=curve[:1]),
        "model_dpo": save(root / "dpo" / "model.pt", tiny_model(tok, 2, scale=5.0), tok),
        "reward_model": save(root / "reward" / "model.pt", RewardModel(tiny_model(tok, 4)), tok, kind="reward_model"),
        "val": str(val), "meta": str(root / "data" / "meta.json"),
    }


def run_stage(inputs, out, stages=("pretrain", "sft", "dpo", "ppo")):
    params = {"eval": {"stages": list(stages), "n_prompts": 6, "max_new_tokens": 6, "val_batches": 2,
                       "n_samples": 2, "samples_per_prompt": 3, "batch_size": 4},
              "data": {"builtin": BUILTIN}, "seed": 3, "code": "test"}
    outputs = {"metrics": str(out / "metrics.csv"), "summary": str(out / "summary.json"),
               "report": str(out / "report.md")}
    env = StageEnv(stage="evaluate", device="cpu", threads=1, tracking_enabled=False)
    return stage.run(params, inputs, outputs, env)


@pytest.fixture(scope="module")
def evaluated(pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return out, run_stage(pipeline, out)  # ppo is listed but has no input: not evaluated


def same(a, b) -> bool:
    return (b is None and pd.isna(a)) or a == pytest.approx(b, rel=1e-12)


@pytest.mark.integration
def test_metrics_csv_has_a_row_per_stage_equal_to_summary(evaluated):
    out, summary = evaluated
    assert summary == json.loads((out / "summary.json").read_text())
    table = pd.read_csv(out / "metrics.csv", index_col="stage")
    assert list(table.index) == ["pretrain", "sft", "dpo"]
    assert list(table.columns) == list(COLUMNS)
    for s in table.index:
        for c in table.columns:
            assert same(table.loc[s, c], summary["stages"][s][c]), (s, c)
    n = summary["n_prompts"]
    assert n + summary["n_skipped"] == 6 and n > 0
    sft = summary["stages"]["sft"]
    assert (sft["win_rate"], sft["ties"], sft["kl_to_sft"]) == (0.5, n, 0.0)
    for s in ("pretrain", "dpo"):
        m = summary["stages"][s]
        assert m["wins"] + m["ties"] + m["losses"] == n
        assert m["win_rate"] == (m["wins"] + m["ties"] / 2) / n
        assert m["kl_to_sft"] is not None and math.isfinite(m["kl_to_sft"])
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["dismissive_rate"] <= 1 and 0 <= m["repetitive_rate"] <= 1
        assert 0 < m["response_tokens"] <= 6
    assert sum(summary["tasks"].values()) == n
    for m in summary["stages"].values():
        assert 0 <= m["accuracy_sampled"] <= m["pass_at_k"] <= 1
        for name in ("accuracy", "pass_at_k"):  # the whole is the prompt-weighted mean of the tasks
            assert sum(m[f"{name}/{t}"] * c for t, c in summary["tasks"].items()) / n == pytest.approx(m[name])
    assert summary["reference"] == "sft" and summary["notes"] == []


@pytest.mark.integration
def test_report_samples_and_plots(evaluated):
    out, summary = evaluated
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| stage"))
    assert all(c in header for c in COLUMNS)
    for s, m in summary["stages"].items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {s} "))
        assert f"{m['val_loss']:.4g}" in row and f"{m['rm_score']:.4g}" in row
        assert f"### {s}" in report
        by_task = report.split("## Accuracy by task")[1].split("##")[0]
        assert "Greedy accuracy / pass@3 on each task's prompts" in by_task
        by_task = by_task.splitlines()
        row = next(line for line in by_task if line.startswith(f"| {s} "))
        assert [c.strip() for c in row.strip("|").split("|")][1:] == [
            f"{m[f'accuracy/{t}']:.3f} / {m[f'pass_at_k/{t}']:.3f}" for t in summary["tasks"]]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in samples] == ["pretrain"] * 2 + ["sft"] * 2 + ["dpo"] * 2
    assert {"prompt", "answer", "task", "response", "rm_score", "correct"} <= samples[0].keys()
    assert all(x["prompt"] in report for x in samples)
    # Curves for the stages whose metrics.json has a history (dpo's has none).
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["pretrain.png", "sft.png"]
    assert (out / "plots" / "pretrain.png").read_bytes()[:4] == b"\x89PNG"
    assert "![pretrain](plots/pretrain.png)" in report


@pytest.mark.integration
def test_without_sft_win_rate_and_kl_are_omitted(pipeline, tmp_path):
    summary = run_stage(pipeline, tmp_path, stages=("pretrain",))
    m = summary["stages"]["pretrain"]
    assert all(m[k] is None for k in ("win_rate", "wins", "ties", "losses", "kl_to_sft"))
    assert summary["reference"] is None and "omitted" in summary["notes"][0]
    table = pd.read_csv(tmp_path / "metrics.csv", index_col="stage")
    assert table["win_rate"].isna().all() and not table["val_loss"].isna().any()
    assert "omitted" in (tmp_path / "report.md").read_text()


def test_tokenizer_mismatch_names_both_files(pipeline, tok, tmp_path):
    other_tok = LMTokenizer.train([TEXT] * 20, vocab_size=290)
    odd = save(tmp_path / "model.pt", tiny_model(tok, 0), other_tok)
    with pytest.raises(LmforgeError, match=re.escape(odd) + ".*" + re.escape(pipeline["reward_model"])):
        run_stage({**pipeline, "model_dpo": odd}, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"dtype": "uint16", "val_bytes_per_token": 3.5, "tokenizer_sha256": other_tok.sha256}))
    with pytest.raises(LmforgeError, match=re.escape(str(meta)) + ": the val tokens were made with another"):
        run_stage({**pipeline, "meta": str(meta)}, tmp_path / "out")
    with pytest.raises(LmforgeError, match="eval.stages lists 'dpo' but .*missing.pt does not exist"):
        run_stage({**pipeline, "model_dpo": str(tmp_path / "missing.pt")}, tmp_path / "out")


@pytest.mark.integration
def test_mlflow_gets_per_stage_metrics_and_the_report(pipeline, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = {"eval": {"stages": ["pretrain", "sft"], "n_prompts": 4, "max_new_tokens": 4, "val_batches": 1,
                       "n_samples": 1, "samples_per_prompt": 0, "batch_size": 4}, "data": {"builtin": BUILTIN}, "seed": 3,
              "code": "test"}
    out = tmp_path / "eval"
    outputs = {k: str(out / f) for k, f in (("metrics", "metrics.csv"), ("summary", "summary.json"),
                                             ("report", "report.md"))}
    summary = stage.run(params, pipeline, outputs, StageEnv(stage="evaluate", device="cpu", threads=1))
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for s in ("pretrain", "sft"):
        assert run.data.metrics[f"{s}/val_loss"] == pytest.approx(summary["stages"][s]["val_loss"])
        assert run.data.metrics[f"{s}/win_rate"] == pytest.approx(summary["stages"][s]["win_rate"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.csv", "summary.json", "report.md", "samples.jsonl", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/pretrain.png",
                                                                                "plots/sft.png"}
