"""Held-out measures of one causal LM, the same for every stage so that stages compare.

- ``val_loss`` / ``val_ppl`` / ``val_bpb``: next-token loss on the pretraining
  val tokens (``lmforge.train.lm.evaluate_lm``).
- ``accuracy``: share of greedy answers to held-out verifiable prompts that
  check out (``tasks.is_correct``).
- ``accuracy_sampled`` / ``pass_at_k``: from k temperature-1 samples per
  prompt, the mean share that check out (pass@1) and the share of prompts
  with at least one that does (pass@k). RL on a verifiable reward mostly moves
  answers the model can already sample to the greedy one, so pass@k bounds
  what it can add to ``accuracy`` unless it teaches something new.
- ``accuracy/<task>`` / ``pass_at_k/<task>``: the same on each task's prompts.
- ``rm_score``: mean reward-model score of those greedy answers.
- ``win_rate`` / ``wins`` / ``ties`` / ``losses``: per prompt, the reward model
  compares this model's greedy answer with the reference model's (the SFT
  model in the evaluate stage); a tie counts half.
- ``kl_to_sft``: KL(model || reference) over whole responses, estimated on
  responses *sampled* from the policy at temperature 1 (k1 estimator:
  mean of log p_policy(y|x) - log p_ref(y|x)). Greedy responses would make
  this a biased estimate; samples from the policy make it unbiased.
- ``dismissive_rate`` / ``repetitive_rate``: shares of greedy answers that
  ``tasks.is_dismissive`` / ``tasks.is_repetitive`` flag.
- ``response_tokens``: mean length of the greedy answers in generated tokens
  (``<|end|>`` not counted).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lmforge.data.prompts import prompt_ids
from lmforge.device import autocast
from lmforge.generate import generate
from lmforge.model import Transformer
from lmforge.tasks import is_correct, is_dismissive, is_repetitive
from lmforge.tokenizer import LMTokenizer
from lmforge.train.lm import TokenWindows, evaluate_lm
from lmforge.train.policy import completion_batch, sequence_logprobs

# Score differences below this are ties: a reward model reads the same text with
# float noise from batch padding, and that noise must not decide a comparison.
TIE_TOLERANCE = 1e-6

# (prompts, responses) -> one score per response, e.g. a reward model's.
Scorer = Callable[[Sequence[dict], Sequence[str]], list[float]]


@dataclass
class Answers:
    """Greedy answers of one model to the evaluation prompts, and their reward-model scores."""

    responses: list[str]
    """Answer texts, cut at ``<|end|>`` (as ``greedy_responses`` gives them)."""
    lengths: list[int]
    """Generated tokens per answer, ``<|end|>`` not counted."""
    scores: list[float]


TASK_EVAL_TOKENS = 32  # enough for every built-in task's answer sentence


def greedy_responses(model: Transformer, tok: LMTokenizer, prompts: Sequence, max_new_tokens: int = TASK_EVAL_TOKENS,
                     batch_size: int = 64) -> list[str]:
    """Temperature-0 answers to prompts (``lmforge.data.prompts``), cut at ``<|end|>``."""
    ids = [prompt_ids(tok, p) for p in prompts]
    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=(tok.end_id,),
                   pad_id=tok.pad_id, batch_size=batch_size)
    return [tok.decode([t for t in toks if t != tok.end_id]) for toks in out.tokens]


def task_metrics(model: Transformer, tok: LMTokenizer, records: Sequence[dict], prompts: Sequence | None = None) -> dict:
    """accuracy and dismissive_rate of greedy answers to ``prompts`` (default: the records' ``prompt``),
    checked against the records' ``answer`` and ``task``: a stage's held-out numbers before and after training."""
    responses = greedy_responses(model, tok, [r["prompt"] for r in records] if prompts is None else prompts)
    n = max(len(records), 1)
    return {"accuracy": sum(is_correct(s, r["answer"], r["task"]) for s, r in zip(responses, records)) / n,
            "dismissive_rate": sum(is_dismissive(s) for s in responses) / n}


def share(flags: Sequence[bool]) -> float:
    """Share of true flags; 0.0 for none."""
    return sum(bool(f) for f in flags) / max(len(flags), 1)


def per_task(records: Sequence[dict], values: Sequence[float], name: str) -> dict:
    """``{name}/{task}``: the mean of ``values`` over each task's records, tasks in sorted order."""
    groups = defaultdict(list)
    for r, v in zip(records, values):
        groups[r["task"]].append(float(v))
    return {f"{name}/{task}": sum(v) / len(v) for task, v in sorted(groups.items())}


def response_metrics(records: Sequence[dict], responses: Sequence[str]) -> dict:
    """accuracy (overall and ``accuracy/<task>``), dismissive_rate and repetitive_rate of answers to
    records (``{"answer", "task"}``)."""
    correct = [is_correct(s, r["answer"], r["task"]) for s, r in zip(responses, records)]
    return {
        "accuracy": share(correct),
        **per_task(records, correct, "accuracy"),
        "dismissive_rate": share([is_dismissive(s) for s in responses]),
        "repetitive_rate": share([is_repetitive(s) for s in responses]),
    }


def win_rate(scores: Sequence[float], baseline: Sequence[float], texts: Sequence[str] | None = None,
             baseline_texts: Sequence[str] | None = None, tol: float = TIE_TOLERANCE) -> dict:
    """Pairwise comparison of two models' answers to the same prompts by their scores.

    Per prompt: a win (1) when the score beats the baseline's by at least ``tol``,
    a tie (1/2) when the scores are within ``tol`` or the two texts are identical,
    a loss (0) otherwise. Returns win_rate = (wins + ties / 2) / n, wins, ties, losses.
    """
    if len(scores) != len(baseline):
        raise ValueError(f"win_rate: {len(scores)} scores but {len(baseline)} baseline scores")
    wins = ties = losses = 0
    for i, (s, b) in enumerate(zip(scores, baseline)):
        same_text = texts is not None and baseline_texts is not None and texts[i] == baseline_texts[i]
        if same_text or abs(s - b) < tol:
            ties += 1
        elif s > b:
            wins += 1
        else:
            losses += 1
    n = len(scores)
    return {"win_rate": (wins + 0.5 * ties) / n if n else None, "wins": wins, "ties": ties, "losses": losses}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that k of n samples, c of them correct, drawn without replacement hold a correct one.

    The unbiased pass@k estimator of Chen et al. (2021): 1 - C(n - c, k) / C(n, k).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def sample_answers(model: Transformer, tok: LMTokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                   seed: int, batch_size: int = 64, n: int = 1) -> list[list[int]]:
    """``n`` temperature-1 samples per prompt, a prompt's samples side by side (no top-k/top-p: the
    model's own distribution), seeded."""
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast(device):
        return generate(model, [tok.prompt_ids(p) for p in prompts for _ in range(n)],
                        max_new_tokens=max_new_tokens, temperature=1.0, stop_ids=(tok.end_id,), pad_id=tok.pad_id,
                        generator=generator, batch_size=batch_size).tokens


def sampled_accuracy(model: Transformer, tok: LMTokenizer, records: Sequence[dict], *, k: int,
                     max_new_tokens: int, seed: int, batch_size: int = 64) -> dict:
    """accuracy_sampled (pass@1) and pass_at_k, overall and per task, of ``k`` temperature-1 samples per record."""
    samples = sample_answers(model, tok, [r["prompt"] for r in records], max_new_tokens=max_new_tokens,
                             seed=seed, batch_size=batch_size, n=k)
    correct = [sum(is_correct(tok.decode([t for t in samples[i * k + j] if t != tok.end_id]), r["answer"], r["task"])
                   for j in range(k)) for i, r in enumerate(records)]
    n = max(len(records), 1)
    passed = [pass_at_k(k, c, k) for c in correct]
    return {"accuracy_sampled": sum(pass_at_k(k, c, 1) for c in correct) / n, "pass_at_k": sum(passed) / n,
            **per_task(records, passed, "pass_at_k")}


@torch.no_grad()
def kl_estimate(policy: Transformer, reference: Transformer, tok: LMTokenizer, prompts: Sequence[str], *,
                max_new_tokens: int, seed: int, batch_size: int = 64,
                sampled: Sequence[Sequence[int]] | None = None) -> float:
    """Monte-Carlo KL(policy || reference) of whole responses, one sample per prompt.

    Each response y is sampled from the policy at temperature 1 (``sample_answers``,
    or given as ``sampled``) and stops at ``<|end|>`` or ``max_new_tokens``; the
    estimate is mean_x [log p_policy(y|x) - log p_ref(y|x)] (k1), unbiased for the
    KL of the response distribution truncated at ``max_new_tokens``. A model
    against itself gives exactly 0.
    """
    device = policy.embed_tokens.weight.device
    prompt_ids = [tok.prompt_ids(p) for p in prompts]
    if sampled is None:
        sampled = sample_answers(policy, tok, prompts, max_new_tokens=max_new_tokens, seed=seed,
                                 batch_size=batch_size)
    total = 0.0
    for start in range(0, len(prompt_ids), batch_size):
        chunk = slice(start, start + batch_size)
        batch = completion_batch(prompt_ids[chunk], sampled[chunk], tok.pad_id, device=device)
        with autocast(device):
            log_ratio = sequence_logprobs(policy, batch) - sequence_logprobs(reference, batch)
        total += log_ratio.sum().item()
    return total / max(len(prompt_ids), 1)


@torch.no_grad()
def answer_prompts(model: Transformer, tok: LMTokenizer, records: Sequence[dict], scorer: Scorer, *,
                   max_new_tokens: int, batch_size: int = 64) -> Answers:
    """Greedy answers to the records' prompts, cut at ``<|end|>``, and the scorer's score of each.

    The same texts as ``greedy_responses``; generating here keeps the token
    counts, which re-encoding the text would not give back exactly (a model may
    emit a non-canonical tokenization or bytes that are not valid UTF-8).
    """
    device = model.embed_tokens.weight.device
    with autocast(device):
        out = generate(model, [tok.prompt_ids(r["prompt"]) for r in records], max_new_tokens=max_new_tokens,
                       temperature=0.0, stop_ids=(tok.end_id,), pad_id=tok.pad_id, batch_size=batch_size)
    ids = [[t for t in toks if t != tok.end_id] for toks in out.tokens]
    responses = [tok.decode(t) for t in ids]
    return Answers(responses, [len(t) for t in ids], scorer(records, responses))


@torch.no_grad()
def evaluate_model(model: Transformer, tok: LMTokenizer, records: Sequence[dict], scorer: Scorer, *,
                   val_windows: TokenWindows, val_batches: int, bytes_per_token: float, max_new_tokens: int,
                   seed: int, batch_size: int = 64, reference: Transformer | None = None,
                   reference_answers: Answers | None = None, pass_k: int = 0) -> tuple[dict, Answers]:
    """Every measure of the module docstring for one model. Returns (metrics, its greedy answers).

    ``reference`` is the model the KL is taken to and ``reference_answers`` its
    greedy answers (the SFT model's in the evaluate stage); without them the
    KL / win-rate entries are None. ``pass_k`` samples per prompt give the sampled
    accuracy and pass@k (0: None).
    """
    model.eval()
    device = model.embed_tokens.weight.device
    with autocast(device):
        metrics = evaluate_lm(model, val_windows, val_batches, bytes_per_token)
    answers = answer_prompts(model, tok, records, scorer, max_new_tokens=max_new_tokens, batch_size=batch_size)
    behaviour = response_metrics(records, answers.responses)
    metrics.update({k: v for k, v in behaviour.items() if k.startswith("accuracy")})
    metrics["rm_score"] = sum(answers.scores) / max(len(answers.scores), 1)
    metrics.update(sampled_accuracy(model, tok, records, k=pass_k, max_new_tokens=max_new_tokens, seed=seed,
                                    batch_size=batch_size) if pass_k else
                   {"accuracy_sampled": None, "pass_at_k": None})
    if reference_answers is not None:
        metrics.update(win_rate(answers.scores, reference_answers.scores, answers.responses,
                                reference_answers.responses))
    else:
        metrics.update({"win_rate": None, "wins": None, "ties": None, "losses": None})
    # Sampled answers are what RL stages optimise: their mean reward is the policy's expected reward.
    prompts = [r["prompt"] for r in records]
    sampled = sample_answers(model, tok, prompts, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    sampled_texts = [tok.decode([t for t in ids if t != tok.end_id]) for ids in sampled]
    sampled_scores = scorer(records, sampled_texts)
    metrics["rm_score_sampled"] = sum(sampled_scores) / max(len(sampled_scores), 1)
    metrics["kl_to_sft"] = None
    if reference is not None:
        metrics["kl_to_sft"] = kl_estimate(model, reference.eval(), tok, prompts, max_new_tokens=max_new_tokens,
                                           seed=seed, batch_size=batch_size, sampled=sampled)
    metrics.update({k: behaviour[k] for k in ("dismissive_rate", "repetitive_rate")})
    metrics["response_tokens"] = sum(answers.lengths) / max(len(answers.lengths), 1)
    return metrics, answers
