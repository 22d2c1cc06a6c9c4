"""The score stage on a tiny policy and reward model: the samples table, the summary, the pairs, the errors."""
import json

import pandas as pd
import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.data.builtin import make_task_data
from lmforge.data.formats import load_preferences, load_prompts
from lmforge.errors import LmforgeError
from lmforge.generate import generate
from lmforge.model import ModelConfig, RewardModel, Transformer
from lmforge.stages import score
from lmforge.tasks import extract_answer, is_correct, is_dismissive, is_repetitive
from lmforge.tokenizer import LMTokenizer
from lmforge.workflow import StageEnv

SEED = 3
BUILTIN = {"n_sft": 60, "n_pref": 10, "n_rl": 30, "n_val": 10}
COLUMNS = ["prompt_id", "sample", "prompt", "task", "answer", "response", "reward", "rm_score", "hf_score", "correct",
           "logprob", "length", "finished", "dismissive", "repetitive"]
PROMPTS = ["What is 12 + 30?", "Reverse the word 'apple'.", "Write 'river' in capital letters.",
           "What does os.path.join do?", "What is 7 - 9?"]


def tiny_config(tok, max_seq_len=48) -> ModelConfig:
    return ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       max_seq_len=max_seq_len)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tokenizer trained on builtin task text; random policies and reward models, one from another tokenizer."""
    d = tmp_path_factory.mktemp("score_models")
    data = make_task_data(BUILTIN, SEED)
    texts = [m["content"] for r in data["sft_train"] for m in r["messages"]] + [r["prompt"] for r in data["rl_train"]]
    tok = LMTokenizer.train(texts, vocab_size=320)
    torch.manual_seed(0)
    cfg = tiny_config(tok)
    save_model(d / "policy.pt", Transformer(cfg), kind="causal_lm", model_config=cfg.to_dict(), tokenizer=tok, meta={})
    save_model(d / "rm.pt", RewardModel(Transformer(cfg)), kind="reward_model", model_config=cfg.to_dict(),
               tokenizer=tok, meta={})
    other = LMTokenizer.train(texts[::-1][:300] + ["zebra quartz violin"] * 20, vocab_size=300)
    ocfg = tiny_config(other)
    save_model(d / "rm_other.pt", RewardModel(Transformer(ocfg)), kind="reward_model", model_config=ocfg.to_dict(),
               tokenizer=other, meta={})
    seq_cfg = tiny_config(tok, max_seq_len=14)
    save_model(d / "policy_short.pt", Transformer(seq_cfg), kind="causal_lm", model_config=seq_cfg.to_dict(),
               tokenizer=tok, meta={})
    return d, tok


def params(data=None, **overrides) -> dict:
    reward_fn = overrides.pop("reward_fn", {"rm": 0.5, "verifiable": 2.0, "hf": 0.0, "hf_model": None})
    section = {"data": data, "n_prompts": 5, "samples_per_prompt": 2, "max_new_tokens": 8, "temperature": 1.0,
               "top_k": 0, "top_p": 1.0, "batch_size": 3, "reward_fn": reward_fn, **overrides}
    return {"score": section, "data": {"builtin": BUILTIN}, "seed": SEED, "code": "test"}


def outputs(d) -> dict:
    return {"samples": str(d / "samples.parquet"), "summary": str(d / "summary.json"), "pairs": str(d / "pairs.jsonl")}


def env(**kw) -> StageEnv:
    return StageEnv(stage="score", seed=SEED, device="cpu", threads=1, tracking_enabled=False, **kw)


def write_prompts(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def regenerate(policy_path, records, p):
    """The stage's samples, drawn again here: same prompts, order, batches and seed."""
    from lmforge.loader import load_model

    model, tok, _ = load_model(policy_path)
    s = p["score"]
    ids = [tok.prompt_ids(r["prompt"]) for r in records for _ in range(s["samples_per_prompt"])]
    out = generate(model, ids, max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], top_k=s["top_k"],
                   top_p=s["top_p"], stop_ids=(tok.end_id,), pad_id=tok.pad_id, batch_size=s["batch_size"],
                   generator=torch.Generator().manual_seed(SEED))
    return out


@pytest.fixture(scope="module")
def scored(models, tmp_path_factory):
    """One stage run on a prompt file whose answers are made to match some of the samples."""
    d, tok = models
    out_dir = tmp_path_factory.mktemp("scored")
    p = params(data="placeholder")
    # Draw the samples first to pick answers: prompt 0 answers what its sample 0 says, the rest cannot be right.
    gen = regenerate(d / "policy.pt", [{"prompt": q} for q in PROMPTS], p)
    first = tok.decode([t for t in gen.tokens[0] if t != tok.end_id])
    answer0 = extract_answer(first, "string")
    assert answer0 is not None
    records = [{"prompt": q, "answer": answer0 if i == 0 else "nothing-says-this", "task": "string"}
               for i, q in enumerate(PROMPTS)]
    p["score"]["data"] = write_prompts(out_dir / "prompts.jsonl", records)
    summary = score.run(p, {"policy": str(d / "policy.pt"), "reward_model": str(d / "rm.pt"),
                            "data": p["score"]["data"]}, outputs(out_dir), env())
    return out_dir, p, summary, gen


@pytest.mark.integration
def test_samples_table(models, scored):
    d, tok = models
    out_dir, p, summary, gen = scored
    table = pd.read_parquet(out_dir / "samples.parquet")
    assert list(table.columns) == COLUMNS
    assert len(table) == len(PROMPTS) * 2
    assert table["prompt_id"].tolist() == [i // 2 for i in range(10)]
    assert table["sample"].tolist() == [0, 1] * 5
    assert table["prompt"].tolist() == [q for q in PROMPTS for _ in range(2)]
    assert table["hf_score"].isna().all()  # hf weight 0: a null column
    # The generated ids, drawn again here, give each row's response, length, finished flag and log-prob.
    for i, row in table.iterrows():
        ids = gen.tokens[i]
        assert row["response"] == tok.decode([t for t in ids if t != tok.end_id])
        assert row["length"] == len(ids) and row["finished"] == (ids[-1] == tok.end_id if ids else False)
        assert row["logprob"] == pytest.approx(gen.logprobs[i].sum().item(), abs=1e-4)
        assert row["correct"] == is_correct(row["response"], row["answer"], "string")
        assert row["dismissive"] == is_dismissive(row["response"])
        assert row["repetitive"] == is_repetitive(row["response"])
    # The reward model reads the ids as generated (an <|end|> only where the model stopped).
    rm = RewardModel(Transformer(tiny_config(tok)))
    rm.load_state_dict(torch.load(d / "rm.pt", weights_only=False)["state_dict"])
    with torch.no_grad():
        direct = [rm(torch.tensor([tok.prompt_ids(PROMPTS[i // 2]) + ids])).item() for i, ids in enumerate(gen.tokens)]
    assert table["rm_score"].tolist() == pytest.approx(direct, abs=1e-5)
    expected = 0.5 * table["rm_score"].astype(float) + 2.0 * table["correct"].astype(float)
    assert table["reward"].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert table.loc[0, "correct"]  # the answer was made from this very sample


@pytest.mark.integration
def test_summary_agrees_with_the_table(scored):
    out_dir, p, summary, _ = scored
    table = pd.read_parquet(out_dir / "samples.parquet")
    on_disk = json.loads((out_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    correct = table["correct"].astype(bool)
    assert on_disk["n_prompts"] == 5 and on_disk["k"] == 2 and on_disk["n_samples"] == 10
    assert on_disk["reward_mean"] == pytest.approx(table["reward"].mean())
    assert on_disk["accuracy"] == pytest.approx(correct.mean())
    assert on_disk["best_of_k_accuracy"] == pytest.approx(correct.groupby(table["prompt_id"]).any().mean())
    assert on_disk["best_of_k_accuracy"] == pytest.approx(1 / 5)  # only prompt 0 can be right
    assert on_disk["rm_score_mean"] == pytest.approx(table["rm_score"].astype(float).mean())
    assert on_disk["hf_score_mean"] is None
    for key, col in [("dismissive_rate", "dismissive"), ("repetitive_rate", "repetitive"),
                     ("finished_rate", "finished"), ("length_mean", "length")]:
        assert on_disk[key] == pytest.approx(table[col].astype(float).mean())
    assert on_disk["n_pairs"] + on_disk["n_pairs_skipped"] == 5 and on_disk["n_skipped"] == 0
    assert on_disk["responses_per_s"] > 0 and on_disk["wall_s"] > 0 and on_disk["mlflow_run_id"] is None
    assert on_disk["source"] == p["score"]["data"]


@pytest.mark.integration
def test_pairs_load_as_preferences(scored):
    out_dir, _, summary, _ = scored
    table = pd.read_parquet(out_dir / "samples.parquet")
    raw = [json.loads(line) for line in (out_dir / "pairs.jsonl").read_text().splitlines()]
    pairs = load_preferences(out_dir / "pairs.jsonl", key="dpo.data")
    assert len(pairs) == len(raw) == summary["n_pairs"] > 0
    for pair, rec in zip(pairs, raw):
        group = table[table["prompt_id"] == rec["prompt_id"]]
        assert pair["prompt"] == [{"role": "user", "content": PROMPTS[rec["prompt_id"]]}]
        chosen = group.loc[group["response"] == pair["chosen"], "reward"].max()
        rejected = group.loc[group["response"] == pair["rejected"], "reward"].min()
        assert chosen == group["reward"].max() and rejected == group["reward"].min()
        assert chosen > rejected and pair["margin"] == pytest.approx(chosen - rejected)


@pytest.mark.integration
def test_same_seed_same_samples(models, scored, tmp_path):
    d, _ = models
    out_dir, p, _, _ = scored
    score.run(p, {"policy": str(d / "policy.pt"), "reward_model": str(d / "rm.pt")}, outputs(tmp_path), env())
    pd.testing.assert_frame_equal(pd.read_parquet(out_dir / "samples.parquet"),
                                  pd.read_parquet(tmp_path / "samples.parquet"))
    assert (out_dir / "pairs.jsonl").read_text() == (tmp_path / "pairs.jsonl").read_text()


@pytest.mark.integration
def test_builtin_prompts_leave_out_those_too_long(models, tmp_path):
    """The builtin rl_train prompts, a 14-token context and the verifiable reward only (no reward model)."""
    d, tok = models
    p = params(n_prompts=12, reward_fn={"rm": 0.0, "verifiable": 1.0, "hf": 0.0, "hf_model": None})
    summary = score.run(p, {"policy": str(d / "policy_short.pt")}, outputs(tmp_path), env())
    first = load_prompts(make_task_data(BUILTIN, SEED)["rl_train"], key="score.data")[:12]
    fits = [r["prompt"] for r in first if len(tok.prompt_ids(r["prompt"])) < 14]
    assert 0 < len(fits) < 12  # the test needs both kinds
    table = pd.read_parquet(tmp_path / "samples.parquet")
    assert summary["n_skipped"] == 12 - len(fits) and summary["n_prompts"] == len(fits)
    assert summary["source"] == "builtin:rl_train"
    assert table["prompt"].tolist() == [q for q in fits for _ in range(2)]
    assert table["rm_score"].isna().all() and summary["rm_score_mean"] is None
    assert table["reward"].tolist() == table["correct"].astype(float).tolist()
    assert (table["length"] <= 14 - table["prompt"].map(lambda q: len(tok.prompt_ids(q)))).all()


def test_user_prompt_too_long_is_an_error(models, tmp_path):
    d, _ = models
    data = write_prompts(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 2?", "answer": 3},
                                                {"prompt": "What is 1 + 2? " * 10, "answer": 3}])
    with pytest.raises(LmforgeError, match=rf"{data} line 2: the prompt is \d+ tokens, but model.max_seq_len is 14"):
        score.run(params(data=data), {"policy": str(d / "policy_short.pt"), "reward_model": str(d / "rm.pt")},
                  outputs(tmp_path / "out"), env())
    assert not (tmp_path / "out").exists()


def test_reward_model_with_another_tokenizer_leaves_nothing(models, tmp_path):
    d, _ = models
    out_dir = tmp_path / "out"
    with pytest.raises(LmforgeError, match=r"the reward model .*rm_other\.pt was trained with a different tokenizer"):
        score.run(params(), {"policy": str(d / "policy.pt"), "reward_model": str(d / "rm_other.pt")},
                  outputs(out_dir), env())
    assert not out_dir.exists()


def test_verifiable_reward_needs_answers(models, tmp_path):
    d, _ = models
    data = write_prompts(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 2?", "answer": 3},
                                                {"question": "Say something nice."}])
    out_dir = tmp_path / "out"
    with pytest.raises(LmforgeError, match=rf"config key 'score\.reward_fn\.verifiable' is 2\.0, but 1 of 2 prompts "
                                           rf"in {data} have no reference answer \(first: {data} line 2\)"):
        score.run(params(data=data), {"policy": str(d / "policy.pt"), "reward_model": str(d / "rm.pt")},
                  outputs(out_dir), env())
    assert not out_dir.exists()


def test_no_reward_weight_is_an_error(models, tmp_path):
    d, _ = models
    with pytest.raises(LmforgeError, match=r"config key 'score\.reward_fn': every weight"):
        score.run(params(reward_fn={"rm": 0.0, "verifiable": 0.0, "hf": 0.0, "hf_model": None}),
                  {"policy": str(d / "policy.pt")}, outputs(tmp_path), env())


@pytest.mark.integration
def test_mlflow_run_mirrors_the_summary(models, tmp_path):
    from mlflow.tracking import MlflowClient

    d, _ = models
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    p = params(reward_fn={"rm": 1.0, "verifiable": 0.0, "hf": 0.0, "hf_model": None})
    summary = score.run(p, {"policy": str(d / "policy.pt"), "reward_model": str(d / "rm.pt")}, outputs(tmp_path),
                        StageEnv(stage="score", seed=SEED, device="cpu", threads=1, tracking_uri=uri))
    run_id = json.loads((tmp_path / "summary.json").read_text())["mlflow_run_id"]
    assert run_id and run_id == summary["mlflow_run_id"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.metrics["reward_mean"] == pytest.approx(summary["reward_mean"])
    assert run.data.params["score.samples_per_prompt"] == "2"
    assert {"samples.parquet", "summary.json", "config.json"} <= {a.path for a in client.list_artifacts(run_id)}
    # Correctness is measured wherever a prompt has an answer, whatever the verifiable weight.
    assert summary["accuracy"] is not None and summary["n_prompts_with_answer"] == 5
