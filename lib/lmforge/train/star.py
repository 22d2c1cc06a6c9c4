"""STaR / rejection-sampling fine-tuning: sample, keep what the checker verifies, fine-tune on it.

One round of STaR (Zelikman et al., 2022, "STaR: Bootstrapping Reasoning With
Reasoning") samples ``samples_per_prompt`` answers per problem from the current model, keeps
those whose final answer checks out against the reference (``lmforge.tasks``),
and fine-tunes on them with the plain SFT loss. Like the paper, each round
restarts from the initial model (here the SFT model) instead of continuing
from the previous round's, which the paper does to avoid overfitting; the
training set is every distinct correct sample kept so far, since each round
here samples a fresh slice of the prompts rather than the whole dataset.

Duplicates are dropped: the samples of an easy prompt are often the same
string, and training on copies would only weight the problems the model
already solves (rejection-sampling fine-tuning, Yuan et al. 2023, likewise
keeps distinct reasoning paths). A correct sample that never emitted
``<|end|>`` is dropped too: its answer checked out, but a response that runs
out of tokens would teach the model not to stop.
"""
from __future__ import annotations

import json
from typing import Sequence

from lmforge.errors import LmforgeError
from lmforge.sections import StarConfig, unanswered  # noqa: F401 (StarConfig: the star section)
from lmforge.tasks import is_correct


def require_answers(records: Sequence[dict], source: str, key: str) -> None:
    """Every prompt needs a reference answer: a sample is kept only when it is verified correct."""
    missing = unanswered(records)
    if missing:
        raise LmforgeError(f"{key}: {missing[0]} of {len(records)} prompts in {source} have no reference answer "
                           f"(first: {missing[1]}); STaR keeps only samples verified against the answer, so give "
                           f"every prompt an 'answer'")


def prompt_key(prompt: str | list[dict]) -> str:
    """A hashable identity of a prompt (a user message or a list of messages)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def keep_correct(records: Sequence[dict], responses: Sequence[str], finished: Sequence[bool],
                 seen: set[tuple[str, str]]) -> tuple[list[dict], int]:
    """The samples to train on: verified correct, finished, and not kept before.

    ``records[i]`` is the prompt record (``prompt``, ``answer``, ``task``) that
    ``responses[i]`` answers. ``seen`` holds the (prompt key, response) pairs
    already kept, this round's included; it is updated in place. Returns
    (kept ``{"prompt", "response", "task", "answer"}`` dicts in input order,
    number of verified-correct samples before the finished/duplicate filter).
    """
    kept, n_correct = [], 0
    for rec, response, done in zip(records, responses, finished, strict=True):
        if not is_correct(response, rec["answer"], rec["task"]):
            continue
        n_correct += 1
        ident = (prompt_key(rec["prompt"]), response)
        if not done or ident in seen:
            continue
        seen.add(ident)
        kept.append({"prompt": rec["prompt"], "response": response, "task": rec["task"], "answer": rec["answer"]})
    return kept, n_correct


def conversation(sample: dict) -> list[dict]:
    """A kept sample as a chat: its prompt (one user message or a message list), then the response."""
    prompt = sample["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [*messages, {"role": "assistant", "content": sample["response"]}]
