"""Prompts as a model reads them: the ids and text of a prompt, and which prompts fit a context.

A prompt is one user message (a string) or a list of messages ending with a
user turn (``{"role", "content"}``, as ``LMTokenizer.render_chat`` takes them).
Every stage, the reward functions and evaluation turn prompts into ids here, and
filter by the same rule: a prompt fits when it leaves the context room for at
least one response token.
"""
from __future__ import annotations

from typing import Callable, Sequence

from lmforge.data.formats import load_preferences


def prompt_ids(tok, prompt, where: str = "conversation") -> list[int]:
    """The ids a model continues to answer ``prompt``: it ends with ``<|assistant|>``."""
    return tok.prompt_ids(prompt) if isinstance(prompt, str) else tok.render_prompt(prompt, where=where)


def prompt_text(prompt) -> str:
    """The prompt as plain text (messages joined by newlines), for models with their own tokenizer."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def _prompt(record: dict):
    return record["prompt"]


def fitting_prompts(records: Sequence[dict], tok, max_seq_len: int,
                    prompt: Callable[[dict], object] = _prompt) -> list[dict]:
    """The records whose prompt (``prompt(record)``, default ``record["prompt"]``) leaves the
    context room for at least one response token."""
    return [r for r in records if len(prompt_ids(tok, prompt(r), r.get("where", "conversation"))) < max_seq_len]


def builtin_pairs(task_data: dict, split: str, tok, max_seq_len: int) -> tuple[list[dict], int]:
    """(preference pairs of a builtin split whose prompt fits the context, number left out).

    Only builtin pairs are filtered: the model's context is a config choice and the
    builtin mixture should work with any. A user's pair that does not fit is an error
    naming it (``train.reward.encode_pairs``).
    """
    pairs = load_preferences(task_data[split], name=f"builtin:{split}")
    kept = fitting_prompts(pairs, tok, max_seq_len)
    return kept, len(pairs) - len(kept)
