"""Record shapes → conversations and preference pairs, with located error messages."""
import json

import pytest

from lmforge.data.formats import load_preferences, load_sft, to_messages, to_preference
from lmforge.errors import LmforgeError

W = "data/x.jsonl line 3"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"role": "system", "content": "Be brief."}, user("hi"), assistant("hello")], "id": 1},
     [{"role": "system", "content": "Be brief."}, user("hi"), assistant("hello")]),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
     [user("hi"), assistant("hello")]),
    ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, [user("Add.\n\n2 and 3"), assistant("5")]),
    ({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, [user("Add 2 and 3."), assistant("5")]),
    ({"instruction": "Add 2 and 3.", "output": "5"}, [user("Add 2 and 3."), assistant("5")]),
    ({"instruction": "Say hi.", "response": "hi"}, [user("Say hi."), assistant("hi")]),
    ({"prompt": "Say hi.", "completion": "hi"}, [user("Say hi."), assistant("hi")]),
    ({"text": "Some prose."}, [assistant("Some prose.")]),
])
def test_each_sft_shape_becomes_its_conversation(record, expected):
    assert to_messages(record, where=W) == expected


def test_unknown_sft_shape_names_location_keys_and_formats():
    with pytest.raises(LmforgeError) as e:
        to_messages({"query": "q", "reply": "a"}, where=W)
    msg = str(e.value)
    assert msg.startswith(f"{W}: unknown SFT record shape, keys seen: ['query', 'reply']")
    for fmt in ("messages", "sharegpt", "alpaca", "instruction/response", "prompt/completion", "gsm8k", "math",
                "process", "oasst", "text"):
        assert fmt in msg


@pytest.mark.parametrize("record, fragment", [
    ({"messages": [user("hi")]}, "no assistant turn"),
    ({"messages": [{"role": "system", "content": "x"}, user("hi")]}, "no assistant turn"),
    ({"messages": []}, "non-empty list of messages"),
    ({"messages": [user("hi"), {"role": "bot", "content": "x"}]}, "field 'messages[1].role' is 'bot'"),
    ({"messages": [user("hi"), {"role": "assistant"}]}, "field 'messages[1].content' must be a string"),
    ({"instruction": "x", "output": 5}, "field 'output' must be a string"),
    ({"prompt": "  ", "completion": "y"}, "field 'prompt' is empty"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "field 'conversations[0].from' is 'robot'"),
    ({"conversations": [{"from": "human", "value": None}]}, "field 'conversations[0].value' must be a string"),
])
def test_bad_sft_records_name_location_and_problem(record, fragment):
    with pytest.raises(LmforgeError) as e:
        to_messages(record, where=W)
    assert str(e.value).startswith(f"{W}: ") and fragment in str(e.value)


def test_preference_pair_with_string_or_message_prompt():
    [p] = to_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5", "task": "x"}, where=W)
    assert p == {"prompt": [user("2+2?")], "chosen": "4", "rejected": "5", "margin": None, "where": W}
    turns = [user("hi"), assistant("hello"), user("2+2?")]
    [p] = to_preference({"prompt": turns, "chosen": "4", "rejected": "5", "margin": 2}, where=W)
    assert p["prompt"] == turns and p["margin"] == 2.0


def test_ranking_expands_to_every_ordered_pair_better_rank_chosen():
    record = {"prompt": "q", "responses": ["b", "a", "d", "c"], "ranks": [2, 1, 4, 3]}
    pairs = to_preference(record, where=W)
    got = {(p["chosen"], p["rejected"]) for p in pairs}
    # rank order a > b > c > d: all 6 pairs, the better one chosen.
    assert got == {("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")}
    assert len(pairs) == 6 and all(p["prompt"] == [user("q")] and p["where"] == W for p in pairs)


def test_scores_rank_higher_first():
    record = {"prompt": "q", "responses": ["b", "a", "c"], "scores": [2.0, 9, -1]}
    got = [(p["chosen"], p["rejected"]) for p in to_preference(record, where=W)]
    assert got == [("a", "b"), ("b", "c"), ("a", "c")]


@pytest.mark.parametrize("record, fragment", [
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranks": [1, 2, 1]},
     "responses 0 and 2 tie at rank 1"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [1]}, "2 responses but 1 ranks"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [1, "x"]}, "field 'ranks[1]' must be a number"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [0.5, 0.5]}, "responses 0 and 1 tie at score 0.5"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [1, 2], "scores": [1, 2]}, "either 'ranks'"),
    ({"prompt": "q", "responses": ["a"], "ranks": [1]}, "at least 2 responses"),
    ({"prompt": "q", "responses": ["a", "b"]}, "ranking record is missing key(s) 'ranks'"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected responses are identical"),
    ({"prompt": "q", "responses": ["a", "a"], "ranks": [1, 2]}, "chosen and rejected responses are identical"),
    ({"prompt": "q", "chosen": "a"}, "preference pair record is missing key(s) 'rejected'"),
    ({"chosen": "a"}, "missing key(s) 'prompt', 'rejected'"),
    ({"prompt": [user("q"), assistant("a")], "chosen": "x", "rejected": "y"}, "must end with a user message"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin' must be a number"),
])
def test_bad_preference_records_name_location_and_problem(record, fragment):
    with pytest.raises(LmforgeError) as e:
        to_preference(record, where=W)
    assert str(e.value).startswith(f"{W}: ") and fragment in str(e.value)


def test_missing_keys_message_lists_needed_and_seen_keys():
    with pytest.raises(LmforgeError) as e:
        to_preference({"prompt": "q", "chosen": "a", "extra": 1}, where=W)
    assert "(needs prompt, chosen, rejected; keys seen: ['chosen', 'extra', 'prompt'])" in str(e.value)


def test_unknown_preference_shape_lists_formats():
    with pytest.raises(LmforgeError, match=r"unknown preference record shape, keys seen: \['text'\]; "
                                           r"supported formats: .*ranking: .*hh_rlhf: .*pair: "):
        to_preference({"text": "x"}, where=W)


def test_load_sft_from_file_mixed_shapes_and_error_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"messages": [user("a"), assistant("b")]}, {"prompt": "c", "completion": "d"}, {"text": "e"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_sft(path) == [[user("a"), assistant("b")], [user("c"), assistant("d")], [assistant("e")]]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps({"foo": 1}) + "\n")
    with pytest.raises(LmforgeError, match=rf"^{path} line 3: unknown SFT record shape, keys seen: \['foo'\]"):
        load_sft(path)


def test_load_sft_csv_alpaca_with_empty_input(tmp_path):
    path = tmp_path / "sft.csv"
    path.write_text("instruction,input,output\nAdd 2 and 3.,,5\n")
    assert load_sft(path) == [[user("Add 2 and 3."), assistant("5")]]


def test_loaders_from_memory_and_empty_inputs(tmp_path):
    pairs = load_preferences([{"prompt": "q", "chosen": "a", "rejected": "b"},
                              {"prompt": "q", "responses": ["x", "y", "z"], "ranks": [3, 1, 2]}],
                             name="builtin:pref_train")
    assert len(pairs) == 4 and pairs[1]["where"] == "builtin:pref_train record 2"
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == ("y", "x")
    with pytest.raises(LmforgeError, match=r"^builtin:sft_train record 2: "):
        load_sft([{"text": "ok"}, {"bad": 1}], name="builtin:sft_train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LmforgeError, match=rf"^sft.data: {empty} holds no records"):
        load_sft(empty)
    with pytest.raises(LmforgeError, match=r"^reward.data: file not found"):
        load_preferences(tmp_path / "nope.jsonl")


def test_builtin_task_data_loads_in_both_shapes():
    from lmforge.data.builtin import make_task_data

    data = make_task_data({"n_sft": 20, "n_pref": 10, "n_rl": 2, "n_val": 2,
                           "tasks": {"arithmetic": 1.0}}, seed=0)
    convs = load_sft(data["sft_train"], name="builtin:sft_train")
    assert len(convs) == 20 and all([m["role"] for m in c] == ["user", "assistant"] for c in convs)
    pairs = load_preferences(data["pref_train"], name="builtin:pref_train")
    assert len(pairs) == 10 and all(p["chosen"] != p["rejected"] for p in pairs)
