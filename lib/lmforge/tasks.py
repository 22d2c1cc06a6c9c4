"""Verifiable answers and behaviour detectors for the built-in tasks.

Reward scoring, GRPO rollouts and evaluation all ask the same questions of a
model's response: which answer does it commit to, is that answer right, and
is the response a dismissive non-answer or a repetitive ramble? They are
answered here, in one place, so that training signal and evaluation agree.

Task names are those of the built-in data (`lmforge.data.builtin`):

- ``arithmetic``: the answer is the last integer, e.g. ``"7 + 8 = 15, 4 + 3 + 1 = 8, so 85."`` -> ``85``;
  the equations before it are the worked steps (see `equation_credit`).
- ``string``: the answer is a word or a count, e.g.
  ``"The reverse of 'apple' is 'elppa'."`` -> ``elppa``.
- ``docstring``: the answer is one sentence, e.g. the first sentence of the
  docstring of ``os.path.join``.
"""

from __future__ import annotations

import re
import string

from lmforge.errors import LmforgeError

TASKS = ("arithmetic", "string", "docstring")

_END_PUNCTUATION = string.punctuation + string.whitespace
_SPACES = re.compile(r"\s+")
# An integer with an optional sign; a '-' right after a digit is a binary
# minus ("37-48"), not a sign, hence the look-behind.
_INTEGER = re.compile(r"(?<!\d)-?\d+")
_NUMBER = re.compile(r"\d+")
_QUOTED = re.compile(r"'([^'\s]+)'|\"([^\"\s]+)\"")
_WORD = re.compile(r"[A-Za-z0-9]+")
# A sentence ends at '.', '!' or '?' followed by whitespace or the end.
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
# Integers joined by + - * on the left of '=', one integer on the right: "4 + 3 + 1 = 8".
_EQUATION_TEXT = r"-?\d+(?:\s*[-+*]\s*\d+)+\s*=\s*-?\d+"
_EQUATION = re.compile(rf"(?<![\d-]){_EQUATION_TEXT}")
# An equation is one word: worked steps share their "+ 0 =" trigrams but are not a ramble.
_TOKEN = re.compile(rf"{_EQUATION_TEXT}|\w+|[^\w\s]")
_ARITH_TOKEN = re.compile(r"(?<![\d\s])-\d+|\d+|[-+*]")  # a leading '-' is a sign, a later one an operator

# Dismissive phrasings used by the built-in data, written loosely enough to
# catch close variants ("I do not know", "cant help", "ask somebody else").
_DISMISSIVE = re.compile(
    "|".join(
        (
            r"\bi (?:do not|don'?t|dunno|have no idea)\b",
            r"\bno idea\b",
            r"\b(?:look|google|search) (?:it|that) up\b",
            r"\b(?:look|google|search) (?:for )?it yourself\b",
            r"\bgoogle it\b",
            r"\bi (?:can ?not|can'?t|won'?t|will not) (?:help|answer|tell)\b",
            r"\bfigure (?:it|that) out\b",
            r"\bask (?:someone|somebody|anyone) else\b",
            r"\bwhy would i know\b",
            r"\bnot my (?:problem|job|concern)\b",
            r"\bi(?:'d| would) rather not\b",
            r"\bnot (?:going|willing) to (?:help|answer)\b",
        )
    )
)

# Share of repeated word trigrams above which a response counts as a ramble.
# Helpful built-in answers stay below 0.12; the built-in rambles are above 0.3.
REPEAT_THRESHOLD = 0.2
_REPEAT_N = 3


def normalize(text: str) -> str:
    """Lowercase, collapse runs of whitespace, strip whitespace/punctuation at the ends."""
    return _SPACES.sub(" ", text.lower()).strip(_END_PUNCTUATION)


def first_sentence(text: str) -> str:
    """The text up to and including the first '.', '!' or '?' that ends a sentence.

    Whitespace is collapsed first, so a sentence broken over lines is one line.
    Text without a sentence end is returned whole (stripped).
    """
    flat = _SPACES.sub(" ", text).strip()
    match = _SENTENCE_END.search(flat)
    return flat[: match.end()] if match else flat


def extract_answer(response: str, task: str) -> str | None:
    """The answer a response commits to, or None when it commits to none.

    - arithmetic: the last integer, with its sign ("37 - 48 = -11." -> "-11").
    - string: whichever comes last of the last quoted token and the last
      number ("'apple' has 5 letters." -> "5"; "... is 'elppa'." -> "elppa");
      without either, the last word.
    - docstring: the first sentence.
    """
    _check_task(task)
    if task == "arithmetic":
        matches = _INTEGER.findall(response)
        return matches[-1] if matches else None
    if task == "string":
        return _last_token(response)
    sentence = first_sentence(response)
    return sentence or None


def is_correct(response: str, answer: str, task: str) -> bool:
    """Whether the answer extracted from `response` equals the reference `answer`.

    Numbers compare as integers. String-task answers compare case-sensitively
    after stripping quotes and punctuation at the ends, because "APPLE" and
    "apple" are different answers to "Write 'apple' in capital letters.".
    Docstring sentences compare after `normalize`.
    """
    extracted = extract_answer(response, task)
    if extracted is None:
        return False
    if _is_integer(extracted) and _is_integer(answer.strip()):
        return int(extracted) == int(answer.strip())
    if task == "string":
        return _strip_ends(extracted) == _strip_ends(answer)
    return normalize(extracted) == normalize(answer)


def answer_credit(response: str, answer: str, task: str) -> float:
    """Partial credit in [0, 1] for a response to a task with reference ``answer``.

    - arithmetic: ``equation_credit``, the share of the equations written in the
      response that hold, so worked steps count, not only the final answer;
    - string: the share of the answer's characters the response's answer gets
      right, compared position by position, integers aligned from the right (the
      ones digit meets the ones digit; a sign or a missing digit is a wrong place),
      other answers from the left, over the longer of the two; a correct answer
      scores 1, no answer 0;
    - docstring: 1 or 0, as ``is_correct``: a sentence is not right letter by letter.
    """
    if task == "arithmetic":
        return equation_credit(response)
    if is_correct(response, answer, task):
        return 1.0
    extracted = extract_answer(response, task)
    if extracted is None or task == "docstring":
        return 0.0
    got, want = extracted.strip(), answer.strip()
    if _is_integer(got) and _is_integer(want):
        got, want = str(int(got))[::-1], str(int(want))[::-1]
    else:
        got, want = _strip_ends(got), _strip_ends(want)
    width = max(len(got), len(want))
    return sum(a == b for a, b in zip(got, want)) / width if width else 0.0


def equation_credit(response: str) -> float:
    """The share of the equations written in a response ("7 + 8 = 15") that hold; 0 without any."""
    steps = equation_steps(response)
    return sum(holds for _, holds in steps) / len(steps) if steps else 0.0


def equation_steps(response: str) -> list[tuple[int, bool]]:
    """Each equation of a response as (the character offset where it ends, whether it holds), in order.

    "7 + 8 = 15, 4 + 3 + 1 = 9" -> [(10, True), (25, False)]: the steps that
    process supervision rewards one by one.
    """
    out = []
    for match in _EQUATION.finditer(response):
        lhs, rhs = match.group().split("=")
        out.append((match.end(), _evaluate(lhs) == int(rhs)))
    return out


def _evaluate(expression: str) -> int:
    """The value of integers joined by + - * ("4 - 3 - 1"), * binding tighter, left to right otherwise."""
    total, sign, product = 0, 1, None
    for token in _ARITH_TOKEN.findall(expression):
        if token in "+-":
            total, sign, product = total + sign * product, 1 if token == "+" else -1, None
        elif token != "*":
            product = int(token) if product is None else product * int(token)
    return total + sign * product


def is_dismissive(response: str) -> bool:
    """Whether a response refuses to engage ("I don't know, look it up."), or is empty."""
    text = normalize(response).replace("\u2019", "'")
    return not text or _DISMISSIVE.search(text) is not None


def repeated_ngram_share(response: str, n: int = _REPEAT_N) -> float:
    """Share of the response's word n-grams that repeat an earlier n-gram.

    Words are lowercased; punctuation marks count as words, and an equation
    ("7 + 8 = 15") is one word, so that a repeated equation ("37 + 48 = 85.
    37 + 48 = 85. 37 + 48 = 85.") is seen as repeated while distinct worked
    steps are not. 0.0 for responses shorter than n + 1 words.
    """
    tokens = _TOKEN.findall(response.lower())
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def is_repetitive(response: str, threshold: float = REPEAT_THRESHOLD) -> bool:
    """Whether the repeated-trigram share of a response exceeds `threshold`."""
    return repeated_ngram_share(response) > threshold


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise LmforgeError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")


def _last_token(response: str) -> str | None:
    """The later of the last quoted token and the last number, else the last word."""
    quoted = list(_QUOTED.finditer(response))
    numbers = list(_NUMBER.finditer(response))
    candidates = [m for m in (quoted[-1] if quoted else None, numbers[-1] if numbers else None) if m]
    if candidates:
        last = max(candidates, key=lambda m: m.end())
        return next(group for group in last.groups() if group is not None) if last.groups() else last.group()
    words = _WORD.findall(response)
    return words[-1] if words else None


def _strip_ends(text: str) -> str:
    return _SPACES.sub(" ", text).strip(_END_PUNCTUATION)


def _is_integer(text: str) -> bool:
    return re.fullmatch(r"-?\d+", text) is not None
