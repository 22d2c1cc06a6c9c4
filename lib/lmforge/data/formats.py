"""Record shapes → conversations (SFT) and preference pairs (reward, DPO).

The shape is detected per record, so one file may mix formats. Conversations
are lists of ``{"role", "content"}`` messages as ``LMTokenizer.render_chat``
takes them. Supported SFT shapes, checked in this order:

- ``messages``: ``{"messages": [{"role": "user", "content": …}, …]}``
- ``conversations`` (ShareGPT): ``{"conversations": [{"from": "human"|"gpt"|"system", "value": …}]}``
- ``alpaca``: ``{"instruction", "input" (optional), "output"}``; a non-empty
  input is appended to the instruction after a blank line.
- ``instruction/response``: ``{"instruction", "response"}``
- ``prompt/completion``: ``{"prompt", "completion"}``
- ``text``: ``{"text"}`` becomes a single assistant turn with no user turn,
  so every token of it is trained on (it teaches content and style without
  inventing a question the text was never an answer to).

Preference shapes become pairs ``{"prompt": [messages], "chosen": str,
"rejected": str, "margin": float | None, "where": str}``:

- ``{"prompt", "chosen", "rejected", "margin" (optional)}``; the prompt is a
  string (one user turn) or a list of messages ending with a user turn.
- ``{"prompt", "responses": [...], "ranks": [...]}``: rank 1 is best; expanded
  to every ordered pair, the better-ranked response chosen. Ties are an
  error: a tie says neither is preferred, which no pair can express.

Every complaint names the record's location (``"data/sft.jsonl line 7: …"``).
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

from lmforge.data.records import location, read_records
from lmforge.errors import LmforgeError
from lmforge.tasks import TASKS
from lmforge.tokenizer import ROLES

SFT_FORMATS = (
    "messages: {messages: [{role, content}, ...]}",
    "conversations: {conversations: [{from: human|gpt|system, value}, ...]}",
    "alpaca: {instruction, input (optional), output}",
    "instruction/response: {instruction, response}",
    "prompt/completion: {prompt, completion}",
    "text: {text}",
)
PREFERENCE_FORMATS = (
    "pair: {prompt, chosen, rejected, margin (optional)}",
    "ranking: {prompt, responses: [...], ranks: [...]} (rank 1 is best)",
)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
PAIR_KEYS = ("prompt", "chosen", "rejected")
RANKING_KEYS = ("prompt", "responses", "ranks")


def _err(where: str, msg: str) -> LmforgeError:
    return LmforgeError(f"{where}: {msg}")


def _text(record: dict, key: str, where: str) -> str:
    """A non-empty string field."""
    value = record[key]
    if not isinstance(value, str):
        raise _err(where, f"field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _err(where, f"field '{key}' is empty")
    return value


# --------------------------------------------------------------------------- SFT


def _check_messages(messages, key: str, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _err(where, f"field '{key}' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _err(where, f"{key}[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise _err(where, f"{key}[{i}] has role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise _err(where, f"{key}[{i}] has no text 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _sharegpt(turns, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise _err(where, "field 'conversations' must be a non-empty list of turns")
    messages = []
    for i, t in enumerate(turns):
        speaker = t.get("from") if isinstance(t, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise _err(where, f"conversations[{i}] has 'from' {speaker!r} "
                              f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        if not isinstance(t.get("value"), str):
            raise _err(where, f"conversations[{i}] has no text 'value'")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": t["value"]})
    return messages


def _exchange(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def to_messages(record: dict, *, where: str) -> list[dict]:
    """The conversation a record holds, as a list of ``{"role", "content"}`` messages.

    ``where`` locates the record in error messages (``"data/sft.jsonl line 7"``).
    Raises LmforgeError for an unknown shape (listing the keys seen and the
    supported formats) or a conversation without an assistant turn.
    """
    if "messages" in record:
        messages = _check_messages(record["messages"], "messages", where)
    elif "conversations" in record:
        messages = _sharegpt(record["conversations"], where)
    elif "instruction" in record and "output" in record:
        instruction = _text(record, "instruction", where)
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise _err(where, f"field 'input' must be a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = _exchange(user, _text(record, "output", where))
    elif "instruction" in record and "response" in record:
        messages = _exchange(_text(record, "instruction", where), _text(record, "response", where))
    elif "prompt" in record and "completion" in record:
        messages = _exchange(_text(record, "prompt", where), _text(record, "completion", where))
    elif "text" in record:
        messages = [{"role": "assistant", "content": _text(record, "text", where)}]
    else:
        raise _err(where, f"unknown SFT record shape, keys seen: {sorted(record)}; "
                          f"supported formats: {'; '.join(SFT_FORMATS)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise _err(where, "the conversation has no assistant turn, so there is nothing to train on")
    return messages


# --------------------------------------------------------------------------- preferences


def _prompt_messages(prompt, where: str) -> list[dict]:
    """A prompt string (one user turn) or a message list that ends with a user turn."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _err(where, "field 'prompt' is empty")
        return [{"role": "user", "content": prompt}]
    messages = _check_messages(prompt, "prompt", where)
    if messages[-1]["role"] != "user":
        raise _err(where, f"field 'prompt' must end with a user message, not {messages[-1]['role']!r}")
    return messages


def _missing(record: dict, keys: Sequence[str], kind: str, where: str) -> None:
    absent = [k for k in keys if k not in record or record[k] is None]
    if absent:
        raise _err(where, f"{kind} record is missing key(s) {', '.join(repr(k) for k in absent)} "
                          f"(needs {', '.join(keys)}; keys seen: {sorted(record)})")


def _pair(prompt: list[dict], chosen: str, rejected: str, margin, where: str) -> dict:
    if chosen == rejected:
        raise _err(where, "chosen and rejected responses are identical, so the pair prefers nothing")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin, "where": where}


def _ranking(record: dict, where: str) -> list[dict]:
    _missing(record, RANKING_KEYS, "ranking", where)
    prompt = _prompt_messages(record["prompt"], where)
    responses, ranks = record["responses"], record["ranks"]
    if not isinstance(responses, list) or not isinstance(ranks, list):
        raise _err(where, "fields 'responses' and 'ranks' must both be lists")
    if len(responses) != len(ranks):
        raise _err(where, f"{len(responses)} responses but {len(ranks)} ranks")
    if len(responses) < 2:
        raise _err(where, "a ranking needs at least 2 responses")
    for i, (response, rank) in enumerate(zip(responses, ranks)):
        if not isinstance(response, str) or not response.strip():
            raise _err(where, f"responses[{i}] must be a non-empty string")
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            raise _err(where, f"ranks[{i}] must be a number, got {rank!r}")
    for i, j in combinations(range(len(ranks)), 2):
        if ranks[i] == ranks[j]:
            raise _err(where, f"responses {i} and {j} tie at rank {ranks[i]}; a ranking must be strict")
    # Every (better, worse) ordered pair, in response order: n responses give n(n-1)/2 pairs.
    return [_pair(prompt, responses[i], responses[j], None, where) if ranks[i] < ranks[j]
            else _pair(prompt, responses[j], responses[i], None, where)
            for i, j in combinations(range(len(ranks)), 2)]


def to_preference(record: dict, *, where: str) -> list[dict]:
    """The preference pairs a record holds: one for a pair record, n(n-1)/2 for a ranking of n.

    Each pair is ``{"prompt": [messages], "chosen": str, "rejected": str,
    "margin": float | None, "where": str}``.
    """
    if "responses" in record or "ranks" in record:
        return _ranking(record, where)
    if not any(k in record for k in PAIR_KEYS):
        raise _err(where, f"unknown preference record shape, keys seen: {sorted(record)}; "
                          f"supported formats: {'; '.join(PREFERENCE_FORMATS)}")
    _missing(record, PAIR_KEYS, "preference pair", where)
    prompt = _prompt_messages(record["prompt"], where)
    chosen, rejected = _text(record, "chosen", where), _text(record, "rejected", where)
    margin = record.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise _err(where, f"field 'margin' must be a number, got {margin!r}")
    return [_pair(prompt, chosen, rejected, None if margin is None else float(margin), where)]


# --------------------------------------------------------------------------- loaders


def _numbered(source: str | Path | Sequence[dict], key: str, name: str | None) -> list[tuple[str, dict]]:
    """(location, record) for a local file or an in-memory list (``"<name> record N"``, 1-based)."""
    if isinstance(source, (str, Path)):
        numbered = [(location(source, line), rec) for line, rec in read_records(source, key=key)]
        label = str(source)
    else:
        label = name or key
        numbered = []
        for i, rec in enumerate(source, start=1):
            if not isinstance(rec, dict):
                raise LmforgeError(f"{label} record {i}: expected an object, got {type(rec).__name__}")
            numbered.append((f"{label} record {i}", rec))
    if not numbered:
        raise LmforgeError(f"{key}: {label} holds no records")
    return numbered


def load_sft(source: str | Path | Sequence[dict], *, key: str = "sft.data",
             name: str | None = None) -> list[list[dict]]:
    """Conversations from a local record file or an in-memory list of records.

    ``key`` is the config key that named the data (used for file-level errors);
    ``name`` labels in-memory records in messages (e.g. ``"builtin:sft_train"``).
    """
    return [to_messages(rec, where=where) for where, rec in _numbered(source, key, name)]


def load_preferences(source: str | Path | Sequence[dict], *, key: str = "reward.data",
                     name: str | None = None) -> list[dict]:
    """Preference pairs (rankings expanded) from a local record file or an in-memory list."""
    return [pair for where, rec in _numbered(source, key, name) for pair in to_preference(rec, where=where)]


# --------------------------------------------------------------------------- RL prompts

PROMPT_FORMATS = ("prompt: {prompt, answer (optional), task (optional)}",
                  "question: {question, answer (optional), task (optional)}")


def to_prompt(record: dict, *, where: str) -> dict:
    """An RL prompt ``{"prompt": str | [messages], "answer": str | None, "task": str, "where": str}``.

    ``task`` picks the answer checker (lmforge.tasks); without one, an integer
    answer is checked as arithmetic and anything else as an exact string.
    """
    key = "prompt" if "prompt" in record else "question" if "question" in record else None
    if key is None:
        raise _err(where, f"unknown prompt record shape, keys seen: {sorted(record)}; "
                          f"supported formats: {'; '.join(PROMPT_FORMATS)}")
    prompt = _prompt_messages(record[key], where)
    prompt = prompt[0]["content"] if len(prompt) == 1 else prompt
    answer = record.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise _err(where, f"field 'answer' must be a string or a number, got {answer!r}")
        answer = str(answer).strip()
    task = record.get("task")
    if task is None:
        task = "arithmetic" if answer is not None and answer.lstrip("-").isdigit() else "string"
    if task not in TASKS:
        raise _err(where, f"field 'task' is {task!r}; expected one of {', '.join(TASKS)}")
    return {"prompt": prompt, "answer": answer, "task": task, "where": where}


def load_prompts(source: str | Path | Sequence[dict], *, key: str, name: str | None = None) -> list[dict]:
    """RL prompts from a local record file or an in-memory list (e.g. the builtin rl_train split)."""
    return [to_prompt(rec, where=where) for where, rec in _numbered(source, key, name)]
