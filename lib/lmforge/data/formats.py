"""Record formats → conversations (SFT), preference pairs (reward, DPO), RL prompts and step labels.

Each record's format is detected from its keys (one file may mix formats), or
named for a whole source with ``format:`` in the stage's ``data`` mapping.
Conversations are lists of ``{"role", "content"}`` messages as
``LMTokenizer.render_chat`` takes them. The formats, by name (FORMATS):

SFT conversations (checked in this order):

- ``oasst``: OpenAssistant/oasst1's flat message-tree rows ``{message_id,
  parent_id, role: prompter|assistant, text, rank}``. A tree is rebuilt from
  the rows of the whole source; each root prompt gives one conversation that
  follows the best-ranked reply at every turn. Deleted rows and rows whose
  review failed are left out, and so are replies whose parent is missing.
- ``messages``: ``{"messages": [{"role", "content"}, …]}`` (ultrachat_200k, smoltalk2).
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}``.
- ``alpaca``: ``{"instruction", "input" (optional), "output"}`` (tatsu-lab/alpaca);
  a non-empty input is appended to the instruction after a blank line.
- ``instruction_response``: ``{"instruction", "response"}``.
- ``process``: step-level supervision (below); only a trace whose every step is
  good is an SFT example: imitating a wrong step, or stopping after a partial
  solution, is what SFT must not learn.
- ``math``: ``{"problem" (or "question"), "reasoning", "answer"}``.
- ``gsm8k``: ``{"question", "answer": "reasoning…\\n#### 42"}`` (openai/gsm8k).
- ``prompt_completion``: ``{"prompt", "completion"}``.
- ``text``: ``{"text"}`` becomes a single assistant turn with no user turn,
  so every token of it is trained on.

Math SFT answers end in one fixed line, ``"The answer is 42."`` (FINAL_ANSWER),
after the reasoning; GSM8K's calculator annotations (``<<48/2=24>>``) are
removed from the reasoning, since a model cannot run them.

Preference pairs ``{"prompt": [messages], "chosen": str, "rejected": str,
"margin": float | None, "where": str}``:

- ``pair``: ``{"prompt", "chosen", "rejected", "margin" (optional)}``; the prompt
  is a string (one user turn) or a list of messages ending with a user turn.
- ``ranking``: ``{"prompt", "responses": [...], "ranks": [...]}`` (1 is best) or
  ``"scores": [...]`` (higher is better); expanded to every ordered pair, the
  better response chosen. Ties are an error: a tie prefers neither response,
  which no pair can express. ``oasst`` rows give rankings of sibling replies.
- ``hh_rlhf``: ``{"chosen", "rejected"}``, each a whole transcript
  ``"\\n\\nHuman: …\\n\\nAssistant: …"`` (Anthropic/hh-rlhf). The prompt is every
  turn before the last Assistant turn, which must be the same in both; the
  responses are the two last Assistant turns.
- ``ultrafeedback``: ``{"prompt", "chosen": [messages], "rejected": [messages]}``
  whose last message is the assistant's answer (ultrafeedback_binarized,
  smoltalk2 Preference). ``score_chosen``/``score_rejected`` are checked to be
  numbers but not used: the pair's order already says which is better.
- ``process``: one pair per trace, at its first bad step (below).

RL prompts ``{"prompt": str | [messages], "answer": str | None, "task": str, "where": str}``:

- ``prompt``: ``{"prompt" (or "question"), "answer" (optional), "task" (optional)}``.
- ``gsm8k``: the reference answer is what follows ``####``; a ``question`` whose
  answer is several lines (a GSM8K solution) must have that line.
- ``math``: ``{"problem", "answer"}``; ``hh_rlhf``: the transcripts' shared prompt.

An integer answer is checked as arithmetic (the last integer of a response),
anything else as the string task (lmforge.tasks), unless ``task`` is given.

Process supervision: ``{"prompt" (or "problem"), "steps": [{"step": str,
"reward": number}, …]}``, or TRL's stepwise form ``{"prompt", "completions":
[str, …], "labels": [bool, …]}``. A step is good when its reward is above 0
(PRM800K's neutral 0 counts as not good). :func:`load_process` gives the steps
with their rewards (``{"prompt", "steps", "rewards", "where"}``) for a
step-level reward model. The pair-trained reward model uses them through one
pair per trace, at the first bad step k (when k > 0): chosen = steps[:k]
(ends on a good step), rejected = steps[:k+1] (adds the bad step), both with
the steps joined by newlines. It teaches the reward model that a wrong step
lowers the score of the same partial solution; steps after the first error
are not used, since they build on it.

Every complaint names the record's location and the field
(``"data/sft.jsonl line 7: field 'steps[2].reward' must be a number, got 'good'"``).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path

from lmforge.data.sources import parse_data_spec, read_data
from lmforge.errors import LmforgeError
from lmforge.tasks import TASKS
from lmforge.tokenizer import ROLES

FORMATS = {
    "messages": "{messages: [{role, content}, ...]}",
    "sharegpt": "{conversations: [{from: human|gpt|system, value}, ...]}",
    "alpaca": "{instruction, input (optional), output}",
    "instruction_response": "instruction/response: {instruction, response}",
    "prompt_completion": "prompt/completion: {prompt, completion}",
    "text": "{text}",
    "math": "{problem, reasoning, answer}",
    "gsm8k": "{question, answer: 'reasoning ... #### 42'}",
    "process": "{prompt|problem, steps: [{step, reward}, ...]} or {prompt, completions: [...], labels: [...]}",
    "oasst": "oasst1 tree rows {message_id, parent_id, role: prompter|assistant, text, rank}",
    "pair": "{prompt, chosen, rejected, margin (optional)}",
    "ranking": "{prompt, responses: [...], ranks: [...] (1 is best) or scores: [...] (higher is better)}",
    "hh_rlhf": "{chosen, rejected} as '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts",
    "ultrafeedback": "{prompt, chosen: [messages], rejected: [messages]} ending with the assistant's answer",
    "prompt": "{prompt|question, answer (optional), task (optional)}",
}
KINDS = {
    "sft": ("oasst", "messages", "sharegpt", "alpaca", "instruction_response", "process", "math", "gsm8k",
            "prompt_completion", "text"),
    "preference": ("oasst", "process", "ranking", "hh_rlhf", "ultrafeedback", "pair"),
    "prompt": ("math", "gsm8k", "prompt", "hh_rlhf"),
}
KIND_NAMES = {"sft": "SFT", "preference": "preference", "prompt": "prompt"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
OASST_KEYS = ("message_id", "parent_id", "role", "text")
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
FINAL_ANSWER = "The answer is {answer}."

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def _err(where: str, msg: str) -> LmforgeError:
    return LmforgeError(f"{where}: {msg}")


def _text(record: dict, key: str, where: str) -> str:
    """A non-empty string field."""
    if key not in record or record[key] is None:
        raise _err(where, f"field '{key}' is missing (keys seen: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise _err(where, f"field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _err(where, f"field '{key}' is empty")
    return value


def _number(value, field: str, where: str) -> float:
    """A JSON number (true/false are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(where, f"field '{field}' must be a number, got {value!r}")
    return float(value)


def _check_messages(messages, key: str, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _err(where, f"field '{key}' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _err(where, f"field '{key}[{i}]' must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise _err(where, f"field '{key}[{i}].role' is {m.get('role')!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise _err(where, f"field '{key}[{i}].content' must be a string, got {m.get('content')!r:.40}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _exchange(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _question(record: dict, where: str) -> str:
    return _text(record, "problem" if "problem" in record else "question", where)


# --------------------------------------------------------------------------- SFT


def _sharegpt(record: dict, where: str) -> list[dict]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _err(where, "field 'conversations' must be a non-empty list of turns")
    messages = []
    for i, t in enumerate(turns):
        speaker = t.get("from") if isinstance(t, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise _err(where, f"field 'conversations[{i}].from' is {speaker!r} "
                              f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        if not isinstance(t.get("value"), str):
            raise _err(where, f"field 'conversations[{i}].value' must be a string, got {t.get('value')!r:.40}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": t["value"]})
    return messages


def _alpaca(record: dict, where: str) -> list[dict]:
    instruction = _text(record, "instruction", where)
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise _err(where, f"field 'input' must be a string, got {type(extra).__name__}")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _exchange(user, _text(record, "output", where))


def _plain_number(answer: str) -> str:
    """``"1,000"`` → ``"1000"``: a reference answer is compared as written, so drop thousands separators."""
    return answer.replace(",", "") if _THOUSANDS.fullmatch(answer) else answer


def _gsm8k_parts(record: dict, where: str) -> tuple[str, str, str]:
    """(question, reasoning without calculator annotations, final answer) of a GSM8K record."""
    question = _text(record, "question", where)
    solution = _text(record, "answer", where)
    reasoning, marker, final = solution.rpartition("####")
    if not marker:
        raise _err(where, "field 'answer' has no '#### <final answer>' line "
                          "(GSM8K writes the reasoning, then '#### 42')")
    final = _plain_number(final.strip())
    if not final:
        raise _err(where, "field 'answer' has nothing after '####'")
    return question, _CALCULATOR.sub("", reasoning).strip(), final


def _math_parts(record: dict, where: str, *, reasoning: bool) -> tuple[str, str, str]:
    """(problem, reasoning, answer) of a ``{problem, reasoning, answer}`` record."""
    question = _question(record, where)
    if "answer" not in record or record["answer"] is None:
        raise _err(where, f"field 'answer' is missing (keys seen: {sorted(record)})")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise _err(where, f"field 'answer' must be a string or a number, got {answer!r}")
    answer = _plain_number(str(answer).strip())
    if not answer:
        raise _err(where, "field 'answer' is empty")
    return question, _text(record, "reasoning", where).strip() if reasoning else "", answer


def _solution(reasoning: str, answer: str) -> str:
    """The assistant's turn of a math example: the reasoning, then the fixed final-answer line."""
    final = FINAL_ANSWER.format(answer=answer)
    return f"{reasoning}\n\n{final}" if reasoning else final


def _sft_math(record: dict, where: str) -> list[dict]:
    question, reasoning, answer = _math_parts(record, where, reasoning=True)
    return _exchange(question, _solution(reasoning, answer))


def _sft_gsm8k(record: dict, where: str) -> list[dict]:
    question, reasoning, answer = _gsm8k_parts(record, where)
    return _exchange(question, _solution(reasoning, answer))


def _sft_process(record: dict, where: str) -> list[dict] | None:
    """The whole trace when every step is good, else None (nothing to imitate)."""
    ex = to_process(record, where=where)
    if not all(r > 0 for r in ex["rewards"]):
        return None
    return ex["prompt"] + [{"role": "assistant", "content": "\n".join(ex["steps"])}]


SFT_CONVERTERS: dict[str, Callable[[dict, str], list[dict] | None]] = {
    "messages": lambda r, w: _check_messages(r.get("messages"), "messages", w),
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "instruction_response": lambda r, w: _exchange(_text(r, "instruction", w), _text(r, "response", w)),
    "prompt_completion": lambda r, w: _exchange(_text(r, "prompt", w), _text(r, "completion", w)),
    "text": lambda r, w: [{"role": "assistant", "content": _text(r, "text", w)}],
    "math": _sft_math,
    "gsm8k": _sft_gsm8k,
    "process": _sft_process,
}


def _conversation(record: dict, where: str, fmt: str) -> list[dict] | None:
    fmt = _resolve(record, "sft", fmt, where)
    messages = SFT_CONVERTERS[fmt](record, where)
    if messages is not None and not any(m["role"] == "assistant" for m in messages):
        raise _err(where, "the conversation has no assistant turn, so there is nothing to train on")
    return messages


def to_messages(record: dict, *, where: str, fmt: str = "auto") -> list[dict]:
    """The conversation a record holds, as a list of ``{"role", "content"}`` messages.

    ``where`` locates the record in error messages (``"data/sft.jsonl line 7"``);
    ``fmt`` names the format, ``"auto"`` detects it from the keys. Raises
    LmforgeError for an unknown shape (listing the keys seen and the
    supported formats), a bad field, or a conversation without an assistant turn.
    """
    messages = _conversation(record, where, fmt)
    if messages is None:
        raise _err(where, "the trace has a step with reward <= 0; only traces whose every step is good "
                          "are SFT examples (use it as reward data)")
    return messages


# --------------------------------------------------------------------------- process supervision


def to_process(record: dict, *, where: str) -> dict:
    """Step-level labels: ``{"prompt": [messages], "steps": [str], "rewards": [float], "where": str}``."""
    key = "problem" if "prompt" not in record and "problem" in record else "prompt"
    prompt = _prompt_messages(record.get(key), key, where)
    if "steps" in record:
        steps = record["steps"]
        if not isinstance(steps, list) or not steps:
            raise _err(where, "field 'steps' must be a non-empty list of {step, reward} objects")
        texts, rewards = [], []
        for i, s in enumerate(steps):
            if not isinstance(s, dict):
                raise _err(where, f"field 'steps[{i}]' must be an object with 'step' and 'reward'")
            text = s.get("step")
            if not isinstance(text, str) or not text.strip():
                raise _err(where, f"field 'steps[{i}].step' must be a non-empty string, got {text!r:.40}")
            texts.append(text)
            rewards.append(_number(s.get("reward"), f"steps[{i}].reward", where))
    else:  # TRL's stepwise supervision: parallel lists of step texts and boolean labels
        texts, labels = record.get("completions"), record.get("labels")
        if not isinstance(texts, list) or not texts:
            raise _err(where, "field 'completions' must be a non-empty list of step texts")
        if not isinstance(labels, list) or len(labels) != len(texts):
            raise _err(where, f"field 'labels' must be a list with one label per step ({len(texts)})")
        for i, (text, label) in enumerate(zip(texts, labels)):
            if not isinstance(text, str) or not text.strip():
                raise _err(where, f"field 'completions[{i}]' must be a non-empty string, got {text!r:.40}")
            if not isinstance(label, bool):
                raise _err(where, f"field 'labels[{i}]' must be true or false, got {label!r}")
        rewards = [1.0 if label else 0.0 for label in labels]
    return {"prompt": prompt, "steps": list(texts), "rewards": rewards, "where": where}


def _process_pairs(record: dict, where: str) -> list[dict]:
    """One pair at the first bad step k > 0: the good prefix steps[:k] over steps[:k+1]."""
    ex = to_process(record, where=where)
    bad = next((k for k, r in enumerate(ex["rewards"]) if r <= 0), None)
    if not bad:  # no bad step, or the very first one: no good prefix to prefer
        return []
    steps = ex["steps"]
    return [_pair(ex["prompt"], "\n".join(steps[:bad]), "\n".join(steps[:bad + 1]), None, where)]


# --------------------------------------------------------------------------- preferences


def _prompt_messages(prompt, key: str, where: str) -> list[dict]:
    """A prompt string (one user turn) or a message list that ends with a user turn."""
    if prompt is None:
        raise _err(where, f"field '{key}' is missing")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _err(where, f"field '{key}' is empty")
        return [{"role": "user", "content": prompt}]
    messages = _check_messages(prompt, key, where)
    if messages[-1]["role"] != "user":
        raise _err(where, f"field '{key}' must end with a user message, not {messages[-1]['role']!r}")
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


def _plain_pair(record: dict, where: str) -> list[dict]:
    _missing(record, ("prompt", "chosen", "rejected"), "preference pair", where)
    prompt = _prompt_messages(record["prompt"], "prompt", where)
    chosen, rejected = _text(record, "chosen", where), _text(record, "rejected", where)
    margin = record.get("margin")
    if margin is not None:
        margin = _number(margin, "margin", where)
    return [_pair(prompt, chosen, rejected, margin, where)]


def _ranking(record: dict, where: str) -> list[dict]:
    if "ranks" in record and "scores" in record:
        raise _err(where, "give either 'ranks' (1 is best) or 'scores' (higher is better), not both")
    order = "scores" if "scores" in record else "ranks"
    _missing(record, ("prompt", "responses", order), "ranking", where)
    prompt = _prompt_messages(record["prompt"], "prompt", where)
    responses, values = record["responses"], record[order]
    if not isinstance(responses, list) or not isinstance(values, list):
        raise _err(where, f"fields 'responses' and '{order}' must both be lists")
    if len(responses) != len(values):
        raise _err(where, f"{len(responses)} responses but {len(values)} {order}")
    if len(responses) < 2:
        raise _err(where, "a ranking needs at least 2 responses")
    for i, response in enumerate(responses):
        if not isinstance(response, str) or not response.strip():
            raise _err(where, f"field 'responses[{i}]' must be a non-empty string")
    values = [_number(v, f"{order}[{i}]", where) for i, v in enumerate(values)]
    for i, j in combinations(range(len(values)), 2):
        if values[i] == values[j]:
            raise _err(where, f"responses {i} and {j} tie at {order[:-1]} {values[i]:g}; a ranking must be strict")
    # A lower rank, or a higher score, is better.
    better = (lambda i, j: values[i] < values[j]) if order == "ranks" else (lambda i, j: values[i] > values[j])
    # Every (better, worse) ordered pair, in response order: n responses give n(n-1)/2 pairs.
    return [_pair(prompt, responses[i], responses[j], None, where) if better(i, j)
            else _pair(prompt, responses[j], responses[i], None, where)
            for i, j in combinations(range(len(values)), 2)]


def _looks_like_transcript(value) -> bool:
    return isinstance(value, str) and ("\n\nAssistant:" in value or value.lstrip().startswith("Human:"))


def _hh_turns(record: dict, key: str, where: str) -> list[dict]:
    """A ``"\\n\\nHuman: …\\n\\nAssistant: …"`` transcript as messages; it must end with an Assistant turn."""
    text = _text(record, key, where)
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise _err(where, f"field '{key}' is not a transcript of '\\n\\nHuman: ' and '\\n\\nAssistant: ' turns")
    messages = [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
                for speaker, content in zip(parts[1::2], parts[2::2])]
    if messages[-1]["role"] != "assistant":
        raise _err(where, f"field '{key}' ends with a Human turn; the last turn must be the Assistant's answer")
    if not messages[-1]["content"]:
        raise _err(where, f"field '{key}': the final Assistant turn is empty")
    if len(messages) < 2 or messages[-2]["role"] != "user":
        raise _err(where, f"field '{key}': the final Assistant turn does not answer a Human turn")
    return messages


def _shared_prompt(chosen: list[dict], rejected: list[dict], where: str) -> list[dict]:
    """The messages before both final answers, which must be the same."""
    prompt, other = chosen[:-1], rejected[:-1]
    if prompt != other:
        turn = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
        raise _err(where, f"field 'rejected': the conversation before its final answer differs from "
                          f"field 'chosen' at turn {turn}; both must answer the same prompt")
    return prompt


def _hh_rlhf(record: dict, where: str) -> tuple[list[dict], str, str]:
    """(shared prompt messages, chosen answer, rejected answer) of an hh-rlhf record."""
    chosen, rejected = _hh_turns(record, "chosen", where), _hh_turns(record, "rejected", where)
    return _shared_prompt(chosen, rejected, where), chosen[-1]["content"], rejected[-1]["content"]


def _ultrafeedback(record: dict, where: str) -> list[dict]:
    convs = {}
    for key in ("chosen", "rejected"):
        conv = _check_messages(record.get(key), key, where)
        last = len(conv) - 1
        if conv[last]["role"] != "assistant":
            raise _err(where, f"field '{key}[{last}].role' is {conv[last]['role']!r}; "
                              f"the last message must be the assistant's answer")
        if not conv[last]["content"].strip():
            raise _err(where, f"field '{key}[{last}].content' is empty")
        if last == 0 or conv[last - 1]["role"] != "user":
            raise _err(where, f"field '{key}' must hold the prompt's messages, ending with a user turn, "
                              f"before the answer")
        convs[key] = conv
    for key in ("score_chosen", "score_rejected"):
        if record.get(key) is not None:
            _number(record[key], key, where)
    prompt = _shared_prompt(convs["chosen"], convs["rejected"], where)
    return [_pair(prompt, convs["chosen"][-1]["content"], convs["rejected"][-1]["content"], None, where)]


PREFERENCE_CONVERTERS: dict[str, Callable[[dict, str], list[dict]]] = {
    "pair": _plain_pair,
    "ranking": _ranking,
    "hh_rlhf": lambda r, w: [_pair(*_hh_rlhf(r, w), None, w)],
    "ultrafeedback": _ultrafeedback,
    "process": _process_pairs,
}


def to_preference(record: dict, *, where: str, fmt: str = "auto") -> list[dict]:
    """The preference pairs a record holds: one for a pair, n(n-1)/2 for a ranking of n,
    none or one for a process-supervision trace.

    Each pair is ``{"prompt": [messages], "chosen": str, "rejected": str,
    "margin": float | None, "where": str}``.
    """
    return PREFERENCE_CONVERTERS[_resolve(record, "preference", fmt, where)](record, where)


# --------------------------------------------------------------------------- RL prompts


def _prompt_record(prompt: list[dict], answer, task, where: str) -> dict:
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise _err(where, f"field 'answer' must be a string or a number, got {answer!r}")
        answer = str(answer).strip()
    if task is None:
        task = "arithmetic" if answer is not None and answer.lstrip("-").isdigit() else "string"
    if task not in TASKS:
        raise _err(where, f"field 'task' is {task!r}; expected one of {', '.join(TASKS)}")
    return {"prompt": prompt[0]["content"] if len(prompt) == 1 else prompt, "answer": answer, "task": task,
            "where": where}


def _plain_prompt(record: dict, where: str) -> dict:
    key = "prompt" if "prompt" in record else "question"
    return _prompt_record(_prompt_messages(record.get(key), key, where), record.get("answer"), record.get("task"),
                          where)


def _gsm8k_prompt(record: dict, where: str) -> dict:
    question, _, answer = _gsm8k_parts(record, where)
    return _prompt_record(_prompt_messages(question, "question", where), answer, record.get("task"), where)


def _math_prompt(record: dict, where: str) -> dict:
    question, _, answer = _math_parts(record, where, reasoning=False)
    return _prompt_record(_prompt_messages(question, "problem", where), answer, record.get("task"), where)


PROMPT_CONVERTERS: dict[str, Callable[[dict, str], dict]] = {
    "prompt": _plain_prompt,
    "gsm8k": _gsm8k_prompt,
    "math": _math_prompt,
    "hh_rlhf": lambda r, w: _prompt_record(_hh_rlhf(r, w)[0], None, None, w),
}


def to_prompt(record: dict, *, where: str, fmt: str = "auto") -> dict:
    """An RL prompt ``{"prompt": str | [messages], "answer": str | None, "task": str, "where": str}``.

    ``task`` picks the answer checker (lmforge.tasks); without one, an integer
    answer is checked as arithmetic and anything else as an exact string.
    """
    return PROMPT_CONVERTERS[_resolve(record, "prompt", fmt, where)](record, where)


# --------------------------------------------------------------------------- detection


def _is_process(record: dict) -> bool:
    return "steps" in record or ("completions" in record and "labels" in record)


def _is_gsm8k_answer(answer) -> bool:
    """A GSM8K solution: it has the '####' line, or it is several lines long (a worked answer)."""
    return isinstance(answer, str) and ("####" in answer or "\n" in answer.strip())


def detect_format(record: dict, kind: str) -> str | None:
    """The name of the format a record's keys say it is in, as ``kind`` ("sft", "preference",
    "prompt") reads it; None when no format fits."""
    if all(k in record for k in OASST_KEYS):
        return "oasst" if kind != "prompt" else None
    if kind == "sft":
        if "messages" in record:
            return "messages"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record and "output" in record:
            return "alpaca"
        if "instruction" in record and "response" in record:
            return "instruction_response"
        if _is_process(record):
            return "process"
        if "reasoning" in record:
            return "math"
        if "question" in record and "answer" in record:
            return "gsm8k"
        if "prompt" in record and "completion" in record:
            return "prompt_completion"
        if "text" in record:
            return "text"
    elif kind == "preference":
        if _is_process(record):
            return "process"
        if any(k in record for k in ("responses", "ranks", "scores")):
            return "ranking"
        if isinstance(record.get("chosen"), list) or isinstance(record.get("rejected"), list):
            return "ultrafeedback"
        if "prompt" not in record and any(_looks_like_transcript(record.get(k)) for k in ("chosen", "rejected")):
            return "hh_rlhf"
        if any(k in record for k in ("prompt", "chosen", "rejected")):
            return "pair"
    elif kind == "prompt":
        if "problem" in record:
            return "math"
        if "question" in record and _is_gsm8k_answer(record.get("answer")):
            return "gsm8k"
        if "prompt" in record or "question" in record:
            return "prompt"
        if "chosen" in record and _looks_like_transcript(record.get("chosen")):
            return "hh_rlhf"
    return None


def _described(kind: str) -> str:
    return "; ".join(f"{name}: {FORMATS[name]}" for name in KINDS[kind])


def check_format(fmt: str, kind: str, key: str) -> None:
    """A format named in the config must be one that ``kind`` can read."""
    if fmt != "auto" and fmt not in KINDS[kind]:
        raise LmforgeError(f"{key}: format {fmt!r} cannot be read as {KIND_NAMES[kind]} data "
                           f"(formats: auto, {', '.join(KINDS[kind])})")


def _resolve(record: dict, kind: str, fmt: str, where: str) -> str:
    if fmt != "auto":
        check_format(fmt, kind, where)
        return fmt
    found = detect_format(record, kind)
    if found is None or found == "oasst":  # oasst rows only make sense as a whole source
        raise _err(where, f"unknown {KIND_NAMES[kind]} record shape, keys seen: {sorted(record)}; "
                          f"supported formats: {_described(kind)}")
    return found


# --------------------------------------------------------------------------- oasst message trees


def _oasst_rows(numbered: list[tuple[str, dict]]) -> tuple[dict, dict]:
    """Checked rows by message id, and the ids of each message's children in source order."""
    rows, children = {}, {}
    for where, row in numbered:
        missing = [k for k in OASST_KEYS if k not in row]
        if missing:
            raise _err(where, f"field '{missing[0]}' is missing; an oasst source has only message rows "
                              f"({', '.join(OASST_KEYS)}; keys seen: {sorted(row)})")
        if row.get("deleted") is True or row.get("review_result") is False:
            continue  # withdrawn or failed review: not fit to train on
        mid = row["message_id"]
        if not isinstance(mid, str) or not mid:
            raise _err(where, f"field 'message_id' must be a non-empty string, got {mid!r}")
        if mid in rows:
            raise _err(where, f"field 'message_id': {mid!r} was already used at {rows[mid][0]}")
        if row["role"] not in OASST_ROLES:
            raise _err(where, f"field 'role' is {row['role']!r} (expected one of {', '.join(OASST_ROLES)})")
        _text(row, "text", where)
        if row.get("rank") is not None:
            _number(row["rank"], "rank", where)
        rows[mid] = (where, row)
        children.setdefault(row["parent_id"], []).append(mid)
    return rows, children


def _oasst_message(row: dict) -> dict:
    return {"role": OASST_ROLES[row["role"]], "content": row["text"]}


def oasst_records(numbered: list[tuple[str, dict]], kind: str) -> list[tuple[str, dict]]:
    """Flat oasst rows → ``(where, record)`` in this module's own formats.

    sft: one ``{"messages"}`` conversation per root prompt, following the
    best-ranked child (lowest rank; the first one when none is ranked) at
    each turn and ending with an assistant turn.
    preference: one ``{"prompt", "responses", "ranks"}`` ranking per prompt
    turn with at least two ranked replies; the prompt is the path from the root.
    Each record is located at the row it is built around (root or prompt turn).
    """
    rows, children = _oasst_rows(numbered)

    def kids(mid: str) -> list[dict]:
        return [rows[c][1] for c in children.get(mid, ())]

    def best(candidates: list[dict]) -> dict | None:
        ranked = [c for c in candidates if c.get("rank") is not None]
        return min(ranked, key=lambda c: c["rank"]) if ranked else (candidates[0] if candidates else None)

    def path(mid: str) -> list[dict] | None:
        """The messages from the root to ``mid``; None when an ancestor is missing."""
        messages = []
        while mid is not None:
            if mid not in rows:
                return None
            row = rows[mid][1]
            messages.append(_oasst_message(row))
            mid = row["parent_id"]
        return messages[::-1]

    out = []
    if kind == "sft":
        for mid in children.get(None, ()):
            where, node = rows[mid]
            if node["role"] != "prompter":
                continue
            messages = []
            while node is not None:
                messages.append(_oasst_message(node))
                # Turns alternate: a reply of the same role as its parent is not part of this conversation.
                node = best([c for c in kids(node["message_id"]) if c["role"] != node["role"]])
            if messages[-1]["role"] != "assistant":
                messages.pop()  # a prompt nobody answered teaches nothing
            if len(messages) >= 2:
                out.append((where, {"messages": messages}))
        return out
    for mid, (where, row) in rows.items():
        replies = [c for c in kids(mid) if c["role"] == "assistant" and c.get("rank") is not None]
        prompt = path(mid) if row["role"] == "prompter" and len(replies) >= 2 else None
        if prompt:
            out.append((where, {"prompt": prompt, "responses": [c["text"] for c in replies],
                                "ranks": [c["rank"] + 1 for c in replies]}))
    return out


# --------------------------------------------------------------------------- loaders

Source = str | Path | dict | Sequence[dict]


def _records(source: Source, key: str, name: str | None, kind: str,
             fmt: str | None) -> tuple[list[tuple[str, dict]], str, str]:
    """(where, record) pairs of a data spec (file, Hub dataset) or an in-memory list,
    the format to read them with, and a label for the source."""
    if isinstance(source, (str, Path, dict)):
        spec = parse_data_spec(source, key)
        fmt = fmt or spec.format
        check_format(fmt, kind, key)  # before any download
        numbered, label = read_data(spec), spec.label
    else:
        fmt, label = fmt or "auto", name or key
        check_format(fmt, kind, key)
        numbered = []
        for i, rec in enumerate(source, start=1):
            if not isinstance(rec, dict):
                raise LmforgeError(f"{label} record {i}: expected an object, got {type(rec).__name__}")
            numbered.append((f"{label} record {i}", rec))
    if not numbered:
        raise LmforgeError(f"{key}: {label} holds no records")
    if fmt == "oasst" or (fmt == "auto" and detect_format(numbered[0][1], kind) == "oasst"):
        numbered = oasst_records(numbered, kind)
        fmt = "messages" if kind == "sft" else "ranking"
        if not numbered:
            raise LmforgeError(f"{key}: the oasst rows of {label} hold no "
                               f"{'answered prompt' if kind == 'sft' else 'prompt with two ranked replies'}")
    return numbered, fmt, label


def load_sft(source: Source, *, key: str = "sft.data", name: str | None = None,
             fmt: str | None = None) -> list[list[dict]]:
    """Conversations from a record file, a Hub dataset, or an in-memory list of records.

    ``source`` is what ``sft.data`` holds (a path, a Hub id or a mapping with
    source/subset/split/format/max_records) or a list of records; ``key`` is
    the config key that named it (used for source-level errors); ``name``
    labels in-memory records in messages (e.g. ``"builtin:sft_train"``);
    ``fmt`` overrides the format (default: the spec's, else detection).
    Process traces with a bad step are left out (see the module notes).
    """
    numbered, fmt, label = _records(source, key, name, "sft", fmt)
    conversations = [c for where, rec in numbered if (c := _conversation(rec, where, fmt)) is not None]
    if not conversations:
        raise LmforgeError(f"{key}: {label} holds no usable conversation (no process trace has only good steps)")
    return conversations


def load_preferences(source: Source, *, key: str = "reward.data", name: str | None = None,
                     fmt: str | None = None) -> list[dict]:
    """Preference pairs (rankings expanded) from a record file, a Hub dataset or an in-memory list."""
    numbered, fmt, label = _records(source, key, name, "preference", fmt)
    pairs = [pair for where, rec in numbered for pair in to_preference(rec, where=where, fmt=fmt)]
    if not pairs:
        raise LmforgeError(f"{key}: {label} gives no preference pair (no process trace has a good step "
                           f"before a bad one)")
    return pairs


def load_prompts(source: Source, *, key: str, name: str | None = None, fmt: str | None = None) -> list[dict]:
    """RL prompts from a record file, a Hub dataset or an in-memory list (e.g. the builtin rl_train split)."""
    numbered, fmt, _ = _records(source, key, name, "prompt", fmt)
    return [to_prompt(rec, where=where, fmt=fmt) for where, rec in numbered]


def load_process(source: Source, *, key: str = "reward.data", name: str | None = None) -> list[dict]:
    """Step-labelled traces ``{"prompt", "steps", "rewards", "where"}`` for a step-level reward model."""
    numbered, _, _ = _records(source, key, name, "preference", "process")
    return [to_process(rec, where=where) for where, rec in numbered]
