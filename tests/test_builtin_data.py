"""The embedded default data: pretraining corpus, docstring facts, task records."""

import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest

from lmforge import tasks
from lmforge.data import builtin
from lmforge.errors import LmforgeError

# ---------------------------------------------------------------------------
# Pretraining corpus
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs():
    return builtin.pretrain_documents()


def test_corpus_is_sorted_unique_clean_and_sized(docs):
    assert docs == sorted(set(docs))
    assert all(len(d) >= builtin.MIN_DOC_CHARS for d in docs)
    assert all(d == d.strip() and "\t" not in d for d in docs)
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    assert 1.0 <= megabytes <= 4.0, megabytes
    assert len(docs) > 1000


def test_corpus_holds_stdlib_docstrings_and_help_topics(docs):
    import pydoc_data.topics

    doc_set = set(docs)
    assert inspect.cleandoc(os.path.join.__doc__) in doc_set
    assert inspect.cleandoc(pydoc_data.topics.topics["assert"]) in doc_set
    assert inspect.cleandoc(importlib.import_module("json").__doc__) in doc_set
    # Modules with side effects or test suites never contribute.
    assert not any("The Zen of Python" in d for d in docs)
    assert not any(d.startswith("Tkinter") for d in docs)


def test_corpus_is_deterministic_and_fast():
    first = builtin.corpus_hash(builtin.pretrain_documents())
    builtin._pretrain_documents.cache_clear()
    builtin._stdlib_scan.cache_clear()
    start = time.perf_counter()
    again = builtin.pretrain_documents()
    assert time.perf_counter() - start < 10
    assert builtin.corpus_hash(again) == first


def test_corpus_ignores_patches_made_in_this_process(monkeypatch):
    """Libraries patch the stdlib (transformers adds Logger methods); the corpus must not see it."""
    import logging

    before = builtin.corpus_hash(builtin.pretrain_documents())
    facts_before = builtin.docstring_facts()

    def shout(self, msg):
        """A method some third-party package bolted onto logging.Logger at import time."""

    monkeypatch.setattr(logging.Logger, "shout", shout, raising=False)
    import calendar

    monkeypatch.setattr(calendar, "isleap", shout)
    builtin._pretrain_documents.cache_clear()
    builtin._docstring_facts.cache_clear()
    builtin._stdlib_scan.cache_clear()
    assert builtin.corpus_hash(builtin.pretrain_documents()) == before
    assert "calendar.isleap" in dict(facts_before)
    assert builtin.docstring_facts() == facts_before


def test_unrunnable_interpreter_is_a_readable_error(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    builtin._stdlib_scan.cache_clear()
    try:
        with pytest.raises(LmforgeError, match="builtin:pretrain corpus: cannot run /nonexistent/python3"):
            builtin._stdlib_scan()
    finally:
        monkeypatch.undo()
        builtin._stdlib_scan.cache_clear()


def test_corpus_hash_matches_reference():
    docs = ["ab", "c", "\u00e9t\u00e9"]
    reference = hashlib.sha256()
    for d in docs:
        data = d.encode("utf-8")
        reference.update(len(data).to_bytes(8, "little") + data)
    assert builtin.corpus_hash(docs) == reference.hexdigest()
    assert builtin.corpus_hash(["ab", "c"]) != builtin.corpus_hash(["a", "bc"])
    assert builtin.corpus_hash(["a", "b"]) != builtin.corpus_hash(["b", "a"])
    assert len(builtin.corpus_hash([])) == 64


# ---------------------------------------------------------------------------
# Docstring facts
# ---------------------------------------------------------------------------


_CLEAN_DOCS_SCRIPT = """
import importlib, inspect, json, sys
out = {}
for name in json.load(sys.stdin):
    module_name, attr = name.rsplit(".", 1)
    obj = getattr(importlib.import_module(module_name), attr)
    out[name] = [callable(obj), inspect.cleandoc(obj.__doc__)]
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def clean_docs():
    """{qualified name: (callable?, cleaned docstring)} of every fact, read by a fresh interpreter.

    This process cannot serve as the reference: pytest replaces sys.unraisablehook.
    """
    names = [name for name, _ in builtin.docstring_facts()]
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _CLEAN_DOCS_SCRIPT], input=json.dumps(names),
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def test_docstring_facts_are_first_sentences_of_real_functions(docs, clean_docs):
    facts = builtin.docstring_facts()
    assert len(facts) > 300
    assert facts == sorted(facts)
    assert len({name for name, _ in facts}) == len(facts)
    doc_set = set(docs)
    for name, sentence in facts:
        is_callable, doc = clean_docs[name]
        assert is_callable
        assert tasks.first_sentence(doc) == sentence
        assert len(sentence) <= builtin.MAX_FACT_CHARS and sentence.endswith(".") and sentence[0].isupper()
        assert "(" not in sentence and "->" not in sentence
        # The model can learn every fact from the pretraining corpus.
        assert doc.strip() in doc_set


def test_os_path_join_fact():
    facts = dict(builtin.docstring_facts())
    if os.name == "posix":
        assert facts["os.path.join"] == tasks.first_sentence(os.path.join.__doc__)


# ---------------------------------------------------------------------------
# Task data
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return builtin.make_task_data({}, seed=0)


def solve(prompt: str, clean_docs: dict) -> str:
    """Reference solver for the built-in prompts, written independently of the generator."""
    if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"+": a + b, "-": a - b, "*": a * b}[op])
    if m := re.fullmatch(r"Reverse the word '(\w+)'\.", prompt):
        return m[1][::-1]
    if m := re.fullmatch(r"Write '(\w+)' in capital letters\.", prompt):
        return m[1].upper()
    if m := re.fullmatch(r"How many letters are in '(\w+)'\?", prompt):
        return str(len(m[1]))
    if m := re.fullmatch(r"Sort the letters of '(\w+)' alphabetically\.", prompt):
        return "".join(sorted(m[1]))
    if m := re.fullmatch(r"What does ([\w.]+) do\?", prompt):
        return tasks.first_sentence(clean_docs[m[1]][1])
    raise AssertionError(f"unexpected prompt {prompt!r}")


def prompt_of(record: dict) -> str:
    return record["messages"][0]["content"] if "messages" in record else record["prompt"]


def test_default_sizes_and_keys(data):
    assert set(data) == set(builtin.SPLITS)
    d = builtin.BUILTIN_DEFAULTS
    expected = {"sft_train": d["n_sft"], "pref_train": d["n_pref"], "rl_train": d["n_rl"],
                "sft_val": d["n_val"], "pref_val": d["n_val"], "rl_val": d["n_val"], "rl_dev": d["n_val"]}
    assert {k: len(v) for k, v in data.items()} == expected
    assert expected["sft_train"] == 6000 and expected["sft_val"] == 200


def test_every_answer_matches_the_reference_solver(data, clean_docs):
    for split, records in data.items():
        for r in records:
            assert r["answer"] == solve(prompt_of(r), clean_docs), (split, r)


def test_train_and_heldout_problems_are_disjoint_across_stages(data):
    train = {prompt_of(r) for s in ("sft_train", "pref_train", "rl_train") for r in data[s]}
    heldout = {prompt_of(r) for s in ("sft_val", "pref_val", "rl_val", "rl_dev") for r in data[s]}
    assert heldout and not train & heldout
    # Membership does not depend on the seed.
    other = builtin.make_task_data({"n_sft": 500, "n_pref": 200, "n_rl": 200}, seed=7)
    other_train = {prompt_of(r) for s in ("sft_train", "pref_train", "rl_train") for r in other[s]}
    assert not other_train & heldout


# The first rl_val prompts of seed 0, as drawn before rl_dev existed.
RL_VAL_HEAD = ["Sort the letters of 'autumn' alphabetically.", "What is 71 - 86?",
               "Sort the letters of 'sock' alphabetically."]


def test_checkpoint_selection_prompts_are_not_the_reported_ones(data):
    # rl_dev picks RL checkpoints, rl_val is what gets reported: no problem in both.
    assert not {prompt_of(r) for r in data["rl_dev"]} & {prompt_of(r) for r in data["rl_val"]}
    # Adding rl_dev left the reported split as it was drawn before.
    assert [prompt_of(r) for r in data["rl_val"][:3]] == RL_VAL_HEAD
    # Once rl_val has used a task's whole held-out pool, rl_dev reuses it rather than failing.
    tiny = builtin.make_task_data({"n_sft": 0, "n_pref": 0, "n_rl": 0, "n_val": 300,
                                   "tasks": {"docstring": 1}, "heldout_fraction": 0.01}, seed=1)
    assert len(tiny["rl_dev"]) == 300 and len(tiny["rl_val"]) == 300


def test_task_mixture_and_noise_shares_are_exact(data):
    sft = data["sft_train"]
    assert Counter(r["task"] for r in sft) == {"arithmetic": 3000, "string": 2100, "docstring": 900}
    assert Counter(r["kind"] for r in sft) == {"helpful": 4500, "dismissive": 600, "wrong": 600, "rambling": 300}
    assert {r["kind"] for r in data["sft_val"]} == {"helpful"}
    assert Counter(r["rejected_kind"] for r in data["pref_train"]) == {"dismissive": 1000, "wrong": 1000, "rambling": 1000}


def test_responses_behave_as_labelled(data):
    for r in data["sft_train"] + data["sft_val"]:
        response, kind = r["messages"][1]["content"], r["kind"]
        correct = tasks.is_correct(response, r["answer"], r["task"])
        if kind == "helpful":
            assert correct and not tasks.is_dismissive(response) and not tasks.is_repetitive(response), r
            assert len(response.split()) <= 25
        elif kind == "wrong":
            assert not correct and not tasks.is_dismissive(response) and not tasks.is_repetitive(response), r
        elif kind == "dismissive":
            assert tasks.is_dismissive(response) and not correct, r
        else:
            assert kind == "rambling" and tasks.is_repetitive(response), r


def test_sums_and_differences_are_worked_in_true_column_steps(data):
    bare = [r["messages"][1]["content"] for r in data["sft_val"] if r["task"] == "arithmetic"]
    assert all(tasks.equation_credit(text) == 1.0 and text.count("=") == 1 for text in bare)  # the default
    worked = builtin.make_task_data({"worked_steps": True, "n_sft": 10, "n_pref": 10, "n_rl": 10}, seed=0)
    for r in worked["sft_val"]:
        if r["task"] == "arithmetic" and "*" not in r["messages"][0]["content"]:
            response = r["messages"][1]["content"]
            assert tasks.equation_credit(response) == 1.0 and len(re.findall(r"=", response)) == 2, response
    from lmforge.data.builtin import _column_steps
    assert _column_steps(47, 38, "+") == "7 + 8 = 15, 4 + 3 + 1 = 8"
    assert _column_steps(45, 37, "-") == "15 - 7 = 8, 4 - 3 - 1 = 0"
    assert _column_steps(37, 48, "-") == "48 - 37: 8 - 7 = 1, 4 - 3 - 0 = 1"
    assert _column_steps(30, 92, "-") == "92 - 30: 2 - 0 = 2, 9 - 3 - 0 = 6"
    assert _column_steps(99, 38, "+") == "9 + 8 = 17, 9 + 3 + 1 = 13"
    assert _column_steps(5, 3, "-") == "5 - 3 = 2, 0 - 0 - 0 = 0"


def test_a_share_of_worked_steps_mixes_the_two_styles_per_answer():
    cfg = {"n_sft": 4000, "n_pref": 1000, "n_rl": 10, "noise": {}}
    mixed = builtin.make_task_data({**cfg, "worked_steps": 0.6}, seed=3)

    def worked(text: str) -> bool:
        return ", so " in text

    sums = [r for r in mixed["sft_train"] if r["task"] == "arithmetic" and "*" not in r["messages"][0]["content"]]
    share = sum(worked(r["messages"][1]["content"]) for r in sums) / len(sums)
    assert 0.55 < share < 0.65, share  # ~1,900 answers: the binomial sd is 0.011
    for r in sums:  # either style answers right, and a worked one holds in every step
        response = r["messages"][1]["content"]
        assert tasks.is_correct(response, r["answer"], "arithmetic"), response
        assert tasks.equation_credit(response) == 1.0 and response.count("=") == (2 if worked(response) else 1)
    # Multiplication and the other tasks have no steps; a pair shows both answers in one style.
    assert not any(worked(r["messages"][1]["content"]) for r in mixed["sft_train"] if r["task"] != "arithmetic")
    pairs = [r for r in mixed["pref_train"] if r["task"] == "arithmetic" and r["rejected_kind"] == "wrong"]
    assert {worked(r["chosen"]) for r in pairs} == {True, False}
    assert all(worked(r["chosen"]) == worked(r["rejected"]) for r in pairs)
    # The ends of the range are the two styles, with the same records as true and false.
    for share, flag in ((0, False), (1, True), (1.0, True)):
        assert builtin.make_task_data({**cfg, "worked_steps": share}, seed=3) == \
            builtin.make_task_data({**cfg, "worked_steps": flag}, seed=3)


def test_preference_pairs(data):
    for r in data["pref_train"] + data["pref_val"]:
        assert r["chosen"] != r["rejected"]
        assert tasks.is_correct(r["chosen"], r["answer"], r["task"])
        assert not tasks.is_dismissive(r["chosen"]) and not tasks.is_repetitive(r["chosen"])
        kind = r["rejected_kind"]
        assert {"dismissive": tasks.is_dismissive, "rambling": tasks.is_repetitive}.get(
            kind, lambda x: not tasks.is_correct(x, r["answer"], r["task"]))(r["rejected"]), r


def test_rl_records_are_checkable(data):
    for r in data["rl_train"] + data["rl_val"]:
        assert set(r) == {"prompt", "answer", "task"}
        assert r["task"] in tasks.TASKS and r["answer"]


def test_same_seed_same_data_different_seed_different(data):
    assert builtin.make_task_data({}, seed=0) == data
    assert builtin.make_task_data({}, seed=1)["sft_train"] != data["sft_train"]


def test_split_sizes_do_not_disturb_other_splits(data):
    smaller = builtin.make_task_data({"n_pref": 10, "n_rl": 5}, seed=0)
    assert smaller["sft_train"] == data["sft_train"]
    assert len(smaller["pref_train"]) == 10 and len(smaller["rl_train"]) == 5


def test_config_overrides():
    out = builtin.make_task_data(
        {"n_sft": 50, "n_pref": 0, "n_rl": 0, "n_val": 10, "tasks": {"arithmetic": 1},
         "noise": {"dismissive": 0.0}}, seed=3)
    assert {r["task"] for s in out.values() for r in s} == {"arithmetic"}
    assert {r["kind"] for r in out["sft_train"]} == {"helpful"}
    assert len(out["sft_train"]) == 50 and out["pref_train"] == [] and len(out["rl_val"]) == 10


def test_validation_problems_are_not_repeated_when_pool_allows(data):
    prompts = [prompt_of(r) for r in data["sft_val"]]
    assert len(prompts) == len(set(prompts))


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"n_sfts": 3}, "data.builtin: unknown key 'n_sfts'"),
        ({"n_sft": -1}, "data.builtin.n_sft: expected a non-negative integer"),
        ({"n_val": 2.5}, "data.builtin.n_val: expected a non-negative integer"),
        ({"heldout_fraction": 1.0}, "data.builtin.heldout_fraction: expected a number strictly between 0 and 1"),
        ({"tasks": {"poetry": 1.0}}, "data.builtin.tasks.poetry: unknown"),
        ({"tasks": {"arithmetic": 0}}, "data.builtin.tasks: at least one weight must be positive"),
        ({"tasks": {"string": -1}}, "data.builtin.tasks.string: expected a non-negative number"),
        ({"noise": {"wrong": 0.7, "rambling": 0.6}}, "data.builtin.noise: shares sum to 1.3"),
        ({"rejected": "wrong"}, "data.builtin.rejected: expected a mapping"),
        ({"worked_steps": "yes"}, "data.builtin.worked_steps: expected true, false or a share between 0 and 1"),
        ({"worked_steps": 1.5}, "data.builtin.worked_steps: expected true, false or a share between 0 and 1, got 1.5"),
    ],
)
def test_bad_config_names_the_key(cfg, message):
    with pytest.raises(LmforgeError, match=re.escape(message)):
        builtin.make_task_data(cfg, seed=0)


def test_word_list():
    words = builtin.WORDS
    assert len(words) >= 300 and len(set(words)) == len(words)
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 7 for w in words)
