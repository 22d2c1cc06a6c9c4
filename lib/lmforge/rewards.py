"""Reward functions for scoring, PPO, GRPO and evaluation: one configurable sum of sources.

    reward = rm * (trained reward model's score)
           + verifiable * (1 if the answer checks out against the reference, else 0)
           + hf * (an external Hugging Face sequence-classification model's score)

A stage's ``reward_fn`` config section gives the weights. Sources with weight 0
are never loaded. The trained reward model reads the policy's own token ids, so
its tokenizer must be the policy's; the external model re-tokenizes the text
with its own tokenizer (prompt and response as a text pair, as reward models
such as ``OpenAssistant/reward-model-deberta-v3-large-v2`` expect).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from lmforge.data.prompts import prompt_ids, prompt_text
from lmforge.errors import LmforgeError
from lmforge.loader import build_model, read_checkpoint
from lmforge.sections import RewardSpec, unanswered  # noqa: F401 (unanswered: re-exported)
from lmforge.tasks import answer_credit, is_correct
from lmforge.train.policy import completion_batch


@dataclass
class Rewards:
    """Per-response rewards, each (N,) float; a source not configured is None."""

    reward: torch.Tensor
    rm: torch.Tensor | None = None
    correct: torch.Tensor | None = None  # 1.0 / 0.0; nan where the prompt has no reference answer
    partial: torch.Tensor | None = None  # answer_credit in [0, 1]; 0 where the prompt has no reference answer
    hf: torch.Tensor | None = None


def check_same_tokenizer(path: str | Path, ckpt: dict, tokenizer, what: str) -> None:
    """A model read with another tokenizer's ids would score gibberish: refuse it."""
    if ckpt["tokenizer_sha256"] != tokenizer.sha256 or ckpt["model_config"]["vocab_size"] < tokenizer.vocab_size:
        raise LmforgeError(
            f"{what} {path} was trained with a different tokenizer (sha256 {ckpt['tokenizer_sha256'][:12]}, "
            f"model vocab {ckpt['model_config']['vocab_size']}) than the policy (sha256 {tokenizer.sha256[:12]}, "
            f"{tokenizer.vocab_size} tokens); train it from the same tokenizer")


class RewardFunction:
    """Callable: ``(records, responses, response_ids=None) -> Rewards``.

    records: dicts with "prompt" (a string or a list of messages ending with a user
    turn) and, for the verifiable source, "answer" and "task".
    response_ids: the policy's token ids of each response (as generated, an
    ``<|end|>`` included when the model stopped); without them the text is encoded
    and ``<|end|>`` appended, the way the reward model was trained.
    """

    def __init__(self, spec: RewardSpec, *, policy_tokenizer, reward_model_path: str | Path | None = None,
                 device: str | torch.device = "cpu", key: str = "reward_fn", batch_size: int = 64):
        self.spec, self.tok, self.device, self.batch_size = spec, policy_tokenizer, torch.device(device), batch_size
        self.reward_model = self.hf_model = self.hf_tokenizer = None
        if spec.rm > 0:
            if reward_model_path is None:
                raise LmforgeError(f"config key '{key}.rm' is {spec.rm}, but no reward model checkpoint was given")
            self.reward_model = _load_reward_model(reward_model_path, policy_tokenizer, self.device)
        if spec.hf > 0:
            self.hf_model, self.hf_tokenizer = _load_hf_classifier(spec.hf_model, self.device, key)

    def __call__(self, records: Sequence[dict], responses: Sequence[str],
                 response_ids: Sequence[Sequence[int]] | None = None) -> Rewards:
        n = len(records)
        out = Rewards(reward=torch.zeros(n))
        if self.reward_model is not None:
            if response_ids is None:
                response_ids = [self.tok.encode(r) + [self.tok.end_id] for r in responses]
            out.rm = self.score_rm(records, response_ids)
            out.reward += self.spec.rm * out.rm
        if self.spec.verifiable > 0:
            out.correct = torch.tensor([float(is_correct(resp, r["answer"], r.get("task") or "string"))
                                        if r.get("answer") is not None else float("nan")
                                        for r, resp in zip(records, responses)])
            out.reward += self.spec.verifiable * torch.nan_to_num(out.correct, nan=0.0)
        if self.spec.partial > 0:
            out.partial = torch.tensor([answer_credit(resp, r["answer"], r.get("task") or "string")
                                        if r.get("answer") is not None else 0.0
                                        for r, resp in zip(records, responses)])
            out.reward += self.spec.partial * out.partial
        if self.hf_model is not None:
            out.hf = self.score_hf(records, responses)
            out.reward += self.spec.hf * out.hf
        return out

    @torch.no_grad()
    def score_rm(self, records: Sequence[dict], response_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Reward-model scores of prompt + response ids, (N,). Over-long rows are cut to max_seq_len, as in training."""
        limit = self.reward_model.trunk.cfg.max_seq_len
        scores = []
        for start in range(0, len(records), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            prompts = [prompt_ids(self.tok, r["prompt"]) for r in records[chunk]]
            rows = [(p + list(ids))[:limit] for p, ids in zip(prompts, response_ids[chunk])]
            batch = completion_batch([row[:1] for row in rows], [row[1:] for row in rows], self.tok.pad_id,
                                     device=self.device)
            scores.append(self.reward_model(batch.input_ids, batch.key_padding_mask).float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    @torch.no_grad()
    def score_hf(self, records: Sequence[dict], responses: Sequence[str]) -> torch.Tensor:
        """External classifier scores of (prompt text, response text) pairs, (N,)."""
        scores = []
        for start in range(0, len(records), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            prompts = [prompt_text(r["prompt"]) for r in records[chunk]]
            enc = self.hf_tokenizer(prompts, list(responses[chunk]), padding=True, truncation=True,
                                    return_tensors="pt").to(self.device)
            scores.append(self.hf_model(**enc).logits[:, 0].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


def _load_reward_model(path: str | Path, tokenizer, device: torch.device):
    ckpt = read_checkpoint(path)  # read once: checked, then built
    check_same_tokenizer(path, ckpt, tokenizer, "the reward model")
    model, _ = build_model(ckpt, path, kind="reward_model", device=device)
    return model.eval().requires_grad_(False)


def _load_hf_classifier(name: str, device: torch.device, key: str):
    """A transformers sequence-classification model with one output (the reward) and its tokenizer."""
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        raise LmforgeError(f"config key '{key}.hf' needs the transformers package (pip install transformers)") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise LmforgeError(f"config key '{key}.hf_model': cannot load {name!r} as a sequence-classification "
                           f"model ({str(e).splitlines()[0]})") from None
    if model.config.num_labels != 1:
        raise LmforgeError(f"config key '{key}.hf_model': {name!r} has {model.config.num_labels} labels; "
                           f"a reward model has exactly 1 (a scalar score)")
    if tokenizer.pad_token is None:  # decoder classifiers often ship without one
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # a decoder classifier finds each row's last real token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval().requires_grad_(False), tokenizer
