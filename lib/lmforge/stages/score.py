"""Score stage: K samples per RL prompt from the SFT policy, each scored by the configured reward.

Prompts are the built-in ``rl_train`` split (``score.data: null``) or a prompt
record file; the first ``score.n_prompts`` are used. Every prompt gets
``score.samples_per_prompt`` (k) sampled responses; ``lmforge.rewards.RewardFunction``
scores them with ``rm * reward model + verifiable * correct + hf * external model``.

Outputs (all written atomically, the summary last):

- ``samples.parquet``: one row per response, ``SAMPLE_COLUMNS``; a reward source
  that is not configured is a null column (``correct`` is filled wherever the
  prompt has a reference answer: it is a measurement, whatever its weight).
- ``pairs.jsonl``: on-policy preference pairs, per prompt the best against the
  worst response by reward, ``{"prompt", "chosen", "rejected", "margin",
  "prompt_id"}``, readable by ``lmforge.data.formats.load_preferences`` (DPO).
- ``summary.json``: means and rates over the table (``summarize``), throughput.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

from lmforge.data.builtin import make_task_data
from lmforge.data.formats import load_prompts
from lmforge.data.prompts import prompt_ids
from lmforge.device import autocast
from lmforge.errors import LmforgeError
from lmforge.files import atomic_write, atomic_write_json, atomic_write_text
from lmforge.generate import GenerationOutput, generate
from lmforge.loader import load_model
from lmforge.rewards import RewardFunction, Rewards, RewardSpec
from lmforge.stages.common import setup
from lmforge.tasks import is_correct, is_dismissive, is_repetitive

KEY = "score.reward_fn"
SAMPLE_COLUMNS = {
    "prompt_id": "index of the prompt among the scored prompts",
    "sample": "0..k-1, the response's number for its prompt",
    "prompt": "the prompt text (a message list as JSON)",
    "task": "the answer checker (lmforge.tasks)",
    "answer": "the reference answer, null when the prompt has none",
    "response": "the decoded response, without <|end|>",
    "reward": "the configured reward (rm * rm_score + verifiable * correct + hf * hf_score)",
    "rm_score": "the trained reward model's score (null when reward_fn.rm is 0)",
    "hf_score": "the external classifier's score (null when reward_fn.hf is 0)",
    "correct": "the response's answer checks out (null when the prompt has no answer)",
    "logprob": "sum of the generated tokens' log-probs at the sampling temperature, <|end|> included",
    "length": "generated tokens, <|end|> included when hit",
    "finished": "the response ended with <|end|> (not cut by max_new_tokens or the context)",
    "dismissive": "lmforge.tasks.is_dismissive(response)",
    "repetitive": "lmforge.tasks.is_repetitive(response)",
}


# --------------------------------------------------------------------------- prompts


def score_prompts(params: dict, tok, max_seq_len: int) -> tuple[list[dict], str, int]:
    """(the first ``score.n_prompts`` prompts that fit the context, their source, how many were left out).

    A built-in prompt too long for the context is left out (the context is a
    config choice, the built-in mixture should work with any); one in the
    user's file is an error naming the record.
    """
    section = params["score"]
    if section["data"]:
        source = section["data"]
        records = load_prompts(source, key="score.data")[:section["n_prompts"]]
        for r in records:
            n = len(prompt_ids(tok, r["prompt"], r.get("where", "prompt")))
            if n >= max_seq_len:
                raise LmforgeError(
                    f"{r['where']}: the prompt is {n} tokens, but model.max_seq_len is {max_seq_len}; "
                    f"it leaves no room for a response (shorten the prompt or raise model.max_seq_len)")
        return records, source, 0
    source = "builtin:rl_train"
    task_data = make_task_data(params["data"]["builtin"], params["seed"])
    records = load_prompts(task_data["rl_train"], key="score.data", name=source)[:section["n_prompts"]]
    kept = [r for r in records if len(prompt_ids(tok, r["prompt"], r.get("where", "prompt"))) < max_seq_len]
    if not kept:
        raise LmforgeError(f"score: no built-in prompt fits model.max_seq_len ({max_seq_len}); raise it")
    return kept, source, len(records) - len(kept)


# --------------------------------------------------------------------------- sampling and the table


def sample_responses(policy, tok, records: list[dict], section: dict, generator: torch.Generator) -> GenerationOutput:
    """samples_per_prompt (k) responses per record, rows ordered prompt-major (record i's samples are rows
    i*k .. i*k+k-1)."""
    ids = [prompt_ids(tok, r["prompt"], r.get("where", "prompt")) for r in records]
    k = section["samples_per_prompt"]
    return generate(policy, [p for p in ids for _ in range(k)], max_new_tokens=section["max_new_tokens"],
                    temperature=section["temperature"], top_k=section["top_k"], top_p=section["top_p"],
                    stop_ids=(tok.end_id,), pad_id=tok.pad_id, generator=generator,
                    batch_size=section["batch_size"])


def response_texts(tok, out: GenerationOutput) -> list[str]:
    return [tok.decode([t for t in toks if t != tok.end_id]) for toks in out.tokens]


def samples_table(records: list[dict], k: int, out: GenerationOutput, texts: list[str],
                  rewards: Rewards) -> pd.DataFrame:
    """One row per response (``SAMPLE_COLUMNS``); nullable dtypes so a missing source is a null column."""
    rows = [r for r in records for _ in range(k)]
    n = len(rows)

    def scores(t: torch.Tensor | None) -> pd.Series:
        return pd.Series([None] * n if t is None else t.tolist(), dtype="Float64")

    correct = [None if r["answer"] is None else is_correct(s, r["answer"], r["task"]) for r, s in zip(rows, texts)]
    return pd.DataFrame({
        "prompt_id": pd.Series([i // k for i in range(n)], dtype="int64"),
        "sample": pd.Series([i % k for i in range(n)], dtype="int64"),
        "prompt": [r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"]) for r in rows],
        "task": [r["task"] for r in rows],
        "answer": pd.Series([r["answer"] for r in rows], dtype="string"),
        "response": texts,
        "reward": rewards.reward.double().numpy(),
        "rm_score": scores(rewards.rm),
        "hf_score": scores(rewards.hf),
        "correct": pd.Series(correct, dtype="boolean"),
        "logprob": [float(lp.sum()) for lp in out.logprobs],
        "length": pd.Series([len(t) for t in out.tokens], dtype="int64"),
        "finished": pd.Series(out.finished, dtype="bool"),
        "dismissive": pd.Series([is_dismissive(s) for s in texts], dtype="bool"),
        "repetitive": pd.Series([is_repetitive(s) for s in texts], dtype="bool"),
    })


def _mean(values: pd.Series) -> float | None:
    """Mean over non-null values; None when there are none (JSON has no NaN)."""
    values = values.dropna()
    return float(values.astype("float64").mean()) if len(values) else None


def summarize(table: pd.DataFrame) -> dict:
    """The summary numbers, a pure function of the samples table.

    accuracy: share of correct responses among those whose prompt has an answer;
    best_of_k_accuracy: share of such prompts with at least one correct response.
    """
    answered = table[table["correct"].notna()]
    best_of_k = answered.groupby("prompt_id")["correct"].any() if len(answered) else pd.Series(dtype="boolean")
    return {
        "n_prompts": int(table["prompt_id"].nunique()),
        "k": int(table.groupby("prompt_id").size().max()),
        "n_samples": len(table),
        "reward_mean": _mean(table["reward"]),
        "reward_std": float(table["reward"].std(ddof=0)),
        "accuracy": _mean(answered["correct"]),
        "best_of_k_accuracy": _mean(best_of_k),
        "n_prompts_with_answer": int(answered["prompt_id"].nunique()),
        "rm_score_mean": _mean(table["rm_score"]),
        "hf_score_mean": _mean(table["hf_score"]),
        "dismissive_rate": _mean(table["dismissive"]),
        "repetitive_rate": _mean(table["repetitive"]),
        "length_mean": _mean(table["length"]),
        "finished_rate": _mean(table["finished"]),
        "logprob_mean": _mean(table["logprob"]),
    }


def preference_pairs(records: list[dict], table: pd.DataFrame) -> tuple[list[dict], int]:
    """(best-vs-worst pair per prompt, number of prompts without a pair).

    Blank responses never enter a pair (a preference file refuses them); a
    prompt whose best and worst rewards tie, or whose two texts are the same,
    prefers nothing and is skipped. Ties pick the earliest sample.
    """
    pairs, skipped = [], 0
    for pid, group in table.groupby("prompt_id", sort=True):
        group = group[group["response"].str.strip() != ""]
        if len(group) < 2:
            skipped += 1
            continue
        best, worst = group.loc[group["reward"].idxmax()], group.loc[group["reward"].idxmin()]
        if best["reward"] == worst["reward"] or best["response"] == worst["response"]:
            skipped += 1
            continue
        pairs.append({"prompt": records[pid]["prompt"], "chosen": best["response"], "rejected": worst["response"],
                      "margin": float(best["reward"] - worst["reward"]), "prompt_id": int(pid)})
    return pairs, skipped


def atomic_write_parquet(path: str | Path, table: pd.DataFrame) -> None:
    atomic_write(path, lambda f: table.to_parquet(f, index=False))


# --------------------------------------------------------------------------- the stage


def run(params: dict, inputs: dict, outputs: dict, env) -> dict:
    t_start = time.perf_counter()
    device = setup(env, params["seed"])
    section = params["score"]
    spec = RewardSpec.from_dict(section["reward_fn"], KEY)
    policy, tok, _ = load_model(inputs["policy"], device=device)
    policy.eval().requires_grad_(False)
    records, source, n_skipped = score_prompts(params, tok, policy.cfg.max_seq_len)
    # Everything a user can get wrong is checked before the first sample: answers, the reward model's tokenizer.
    spec.check_prompts(records, source, KEY)
    reward_fn = RewardFunction(spec, policy_tokenizer=tok, reward_model_path=inputs.get("reward_model"),
                               device=device, key=KEY, batch_size=section["batch_size"])
    k = section["samples_per_prompt"]
    print(f"score: {len(records)} prompts from {source} ({n_skipped} left out: prompt too long), k={k}, on {device}")

    # Lineage names only what this run read: the reward model when rm is weighted, the prompt file when given.
    used = {"policy": inputs["policy"]}
    if spec.rm > 0:
        used["reward_model"] = inputs["reward_model"]
    if section["data"]:
        used["data"] = section["data"]
    with env.tracker(params, used) as run:
        run.set_tags({"device": str(device)})
        # One generator on the sampling device: the same seed gives the same samples.
        generator = torch.Generator(device=device).manual_seed(params["seed"])
        t0 = time.perf_counter()
        with autocast(device):
            out = sample_responses(policy, tok, records, section, generator)
        t1 = time.perf_counter()
        texts = response_texts(tok, out)
        rows = [r for r in records for _ in range(k)]
        with autocast(device):
            rewards = reward_fn(rows, texts, response_ids=out.tokens)
        t2 = time.perf_counter()

        table = samples_table(records, k, out, texts, rewards)
        pairs, n_unpaired = preference_pairs(records, table)
        n = len(table)
        summary = {
            **summarize(table), "source": source, "n_skipped": n_skipped,
            "n_pairs": len(pairs), "n_pairs_skipped": n_unpaired,
            "sample_s": t1 - t0, "score_s": t2 - t1, "responses_per_s": n / max(t2 - t0, 1e-9),
            "sample_tokens_per_s": int(table["length"].sum()) / max(t1 - t0, 1e-9),
            "device": str(device), "mlflow_run_id": run.run_id,
        }
        atomic_write_parquet(outputs["samples"], table)
        atomic_write_text(outputs["pairs"], "".join(json.dumps(p) + "\n" for p in pairs))
        summary["wall_s"] = time.perf_counter() - t_start
        atomic_write_json(outputs["summary"], summary)

        run.log_metrics({k_: v for k_, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                        step=0)
        run.log_dict(params, "config.json")
        for name in ("samples", "summary"):
            run.log_artifact(outputs[name])
        if env.log_path:
            run.log_artifact(env.log_path)

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    print(f"score: {n} responses in {t2 - t0:.1f}s ({summary['responses_per_s']:.1f}/s), reward "
          f"{fmt(summary['reward_mean'])}, accuracy {fmt(summary['accuracy'])}, best-of-{k} "
          f"{fmt(summary['best_of_k_accuracy'])}, {len(pairs)} pairs ({n_unpaired} prompts without one)")
    return summary
