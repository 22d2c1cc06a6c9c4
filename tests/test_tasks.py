"""The answer checker and behaviour detectors of lmforge.tasks."""

import pytest

from lmforge import tasks
from lmforge.errors import LmforgeError


def reference_repeat_share(text: str, n: int = 3) -> float:
    """1 - unique/total over word n-grams, punctuation marks and whole equations counting as words."""
    import re

    words = []
    for piece in re.split(r"(-?\d+(?:\s*[-+*]\s*\d+)+\s*=\s*-?\d+)", text.lower()):
        is_equation = "=" in piece and any(c.isdigit() for c in piece)
        words += [piece] if is_equation else re.findall(r"\w+|[^\w\s]", piece)
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if len(grams) < 2 else 1 - len(set(grams)) / len(grams)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  Hello,   World!  ", "hello, world"),
        ("'APPLE'.", "apple"),
        ("Join two\n\tpaths.", "join two paths"),
        ("...", ""),
        ("", ""),
    ],
)
def test_normalize(text, expected):
    assert tasks.normalize(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Return the cosine of x. More text here.", "Return the cosine of x."),
        ("One line\nbroken. Two.", "One line broken."),
        ("No end at all", "No end at all"),
        ("Version 3.11 is out! Yes.", "Version 3.11 is out!"),
    ],
)
def test_first_sentence(text, expected):
    assert tasks.first_sentence(text) == expected


@pytest.mark.parametrize(
    "response, task, expected",
    [
        ("37 + 48 = 85.", "arithmetic", "85"),
        ("37 - 48 = -11.", "arithmetic", "-11"),
        ("37-48 = 11", "arithmetic", "11"),
        ("I think it is 12, no, 13", "arithmetic", "13"),
        ("no digits", "arithmetic", None),
        ("The reverse of 'apple' is 'elppa'.", "string", "elppa"),
        ("'apple' has 5 letters.", "string", "5"),
        ('"apple" in capital letters is "APPLE".', "string", "APPLE"),
        ("it is elppa", "string", "elppa"),
        ("", "string", None),
        ("Join two paths. Then more.", "docstring", "Join two paths."),
        ("   ", "docstring", None),
    ],
)
def test_extract_answer(response, task, expected):
    assert tasks.extract_answer(response, task) == expected


@pytest.mark.parametrize(
    "response, answer, task, expected",
    [
        ("37 + 48 = 85.", "85", "arithmetic", True),
        ("37 + 48 = 86.", "85", "arithmetic", False),
        ("The answer is 085", "85", "arithmetic", True),
        ("71 - 86 = -15.", "-15", "arithmetic", True),
        ("71 - 86 = 15.", "-15", "arithmetic", False),
        ("'cake' in capital letters is 'CAKE'.", "CAKE", "string", True),
        ("'cake' in capital letters is 'cake'.", "CAKE", "string", False),
        ("'earth' has 5 letters.", "5", "string", True),
        ("'earth' has 6 letters.", "5", "string", False),
        ("join two paths", "Join two paths.", "docstring", True),
        ("Join two files.", "Join two paths.", "docstring", False),
        ("I don't know, look it up.", "85", "arithmetic", False),
    ],
)
def test_is_correct(response, answer, task, expected):
    assert tasks.is_correct(response, answer, task) is expected


def test_unknown_task_is_a_readable_error():
    with pytest.raises(LmforgeError, match="unknown task 'poetry'"):
        tasks.is_correct("x", "x", "poetry")


@pytest.mark.parametrize(
    "response",
    [
        "I don't know, look it up.",
        "i do not know",
        "I dont know.",
        "I can't help with that.",
        "I cannot help you.",
        "Figure it out yourself.",
        "No idea. Ask someone else.",
        "Why would I know that?",
        "That is not my problem.",
        "Google it.",
        "I\u2019d rather not answer that.",
        "",
        "   ",
    ],
)
def test_dismissive_phrasings_and_variants(response):
    assert tasks.is_dismissive(response)


@pytest.mark.parametrize(
    "response",
    ["37 + 48 = 85.", "The reverse of 'apple' is 'elppa'.", "Look up a name in the table.", "Return an idea."],
)
def test_helpful_responses_are_not_dismissive(response):
    assert not tasks.is_dismissive(response)


@pytest.mark.parametrize(
    "text",
    [
        "37 + 48 = 85. 37 + 48 = 85. 37 + 48 = 85.",
        "Well, let me see. Well, let me see. Well, let me see. 37 + 48 = 85.",
        "the the the the the the the",
        "7 + 8 = 15, 4 + 3 + 1 = 8, so 85.",
        "6 + 0 = 6, 0 + 6 + 0 = 6, so 66. 6 + 0 = 6, 0 + 6 + 0 = 6, so 66.",
        "Hello there, how are you today?",
        "a b",
        "",
    ],
)
def test_repeated_share_matches_reference(text):
    assert tasks.repeated_ngram_share(text) == pytest.approx(reference_repeat_share(text))


def test_is_repetitive_threshold():
    assert tasks.is_repetitive("37 + 48 = 85. 37 + 48 = 85. 37 + 48 = 85.")
    assert tasks.is_repetitive("the the the the the the the")
    assert not tasks.is_repetitive("6 + 0 = 6, 0 + 6 + 0 = 6, so 66.")  # worked steps, not a ramble
    assert not tasks.is_repetitive("Return the number of items in the list.")
    assert not tasks.is_repetitive("'apple' in capital letters is 'APPLE'.")


@pytest.mark.parametrize("expression, value", [("4 - 3 - 1", 0), ("-3 + 4", 1), ("2 * 3 + 4", 10), ("10 - 2 * 3", 4),
                                               ("01 - 5", -4), ("7", 7)])
def test_evaluate_follows_arithmetic_precedence(expression, value):
    assert tasks._evaluate(expression) == value


@pytest.mark.parametrize("response, credit", [
    ("7 + 8 = 15, 4 + 3 + 1 = 8, so 85.", 1.0),
    ("8 - 2 = 8, 8 - 2 - 0 = 6, so 68.", 0.5),
    ("75 - 87: 15 - 7 = 7, 7 - 8 - 1 = 0, so -7.", 0.0),  # "75 - 87:" has no '=': not an equation
    ("81 - 37: 11 - 7 = 4, 8 - 3 - 1 = 4, so -44.", 1.0),
    ("7 * 8 = 56.", 1.0),
    ("37-48=-11", 1.0),
    ("so 85.", 0.0),
])
def test_equation_credit_is_the_share_of_true_equations(response, credit):
    assert tasks.equation_credit(response) == pytest.approx(credit)


@pytest.mark.parametrize("response, answer, task, credit", [
    ("7 + 8 = 15, 4 + 3 + 0 = 8, so 85.", "85", "arithmetic", 0.5),  # arithmetic: the worked steps
    ("The reverse of 'apple' is 'elppa'.", "elppa", "string", 1.0),
    ("The reverse of 'apple' is 'elpap'.", "elppa", "string", 0.6),  # letters in place, from the left
    ("'apple' has 15 letters.", "5", "string", 0.5),  # numbers aligned from the right
    ("'apple' has 6 letters.", "5", "string", 0.0),
    ("Join two paths.", "Join two or more paths.", "docstring", 0.0),  # a sentence is right or wrong
    ("Join two or more paths.", "Join two or more paths.", "docstring", 1.0),
    ("I don't know.", "elppa", "string", 0.0),
])
def test_answer_credit(response, answer, task, credit):
    assert tasks.answer_credit(response, answer, task) == pytest.approx(credit)
