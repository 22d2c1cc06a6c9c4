"""Public dataset formats: each fixture is written here in the exact schema of the public set
(Anthropic/hh-rlhf, ultrafeedback_binarized, tatsu-lab/alpaca, ShareGPT, openai/gsm8k,
process supervision, OpenAssistant/oasst1), converted, and checked field by field;
broken records are named by file, line (record for Parquet and the Hub) and field."""
import copy
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lmforge.config import apply_schema, check_config, load_config, load_schema
from lmforge.data.formats import (FINAL_ANSWER, FORMATS, KINDS, check_format, detect_format, load_preferences,
                                  load_process, load_prompts, load_sft, oasst_records, to_messages)
from lmforge.data.sources import data_file, parse_data_spec
from lmforge.errors import LmforgeError
from lmforge.tasks import is_correct

PRESETS = Path(__file__).resolve().parents[1] / "config" / "presets"
STAGES_WITH_DATA = {"sft": "sft", "reward": "preference", "dpo": "preference", "score": "prompt",
                    "ppo": "prompt", "grpo": "prompt", "star": "prompt"}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def raises_at(path: Path, line: int, fragment: str):
    """pytest.raises for one located complaint: '<file> line <N>: …<fragment>…'."""
    return pytest.raises(LmforgeError, match=rf"^{re.escape(str(path))} line {line}: .*{re.escape(fragment)}")


# --------------------------------------------------------------------------- Anthropic/hh-rlhf

HH = [
    {"chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
     "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: Why would I know that?"},
    {"chosen": "\n\nHuman: Can you help me plan a picnic?\n\nAssistant: Sure. Where would you like to go?"
               "\n\nHuman: A park by the lake.\n\nAssistant: Pack sandwiches and water.\n\nBring a blanket too.",
     "rejected": "\n\nHuman: Can you help me plan a picnic?\n\nAssistant: Sure. Where would you like to go?"
                 "\n\nHuman: A park by the lake.\n\nAssistant: Picnics are boring. "},
]


def test_hh_rlhf_transcripts_become_shared_prompt_and_final_answers(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", HH)
    single, multi = load_preferences(path)
    assert single == {"prompt": [user("What is the capital of France?")],
                      "chosen": "The capital of France is Paris.", "rejected": "Why would I know that?",
                      "margin": None, "where": f"{path} line 1"}
    # Multi-turn history is kept as messages; a blank line inside an answer is not a turn boundary.
    assert multi["prompt"] == [user("Can you help me plan a picnic?"), assistant("Sure. Where would you like to go?"),
                               user("A park by the lake.")]
    assert multi["chosen"] == "Pack sandwiches and water.\n\nBring a blanket too."
    assert multi["rejected"] == "Picnics are boring."
    assert multi["where"] == f"{path} line 2"
    # The same records as RL prompts: the shared prompt, no reference answer.
    prompts = load_prompts(path, key="ppo.data")
    assert prompts[0] == {"prompt": "What is the capital of France?", "answer": None, "task": "string",
                          "where": f"{path} line 1"}
    assert prompts[1]["prompt"] == multi["prompt"]


@pytest.mark.parametrize("line2, fragment", [
    ({"chosen": HH[1]["chosen"], "rejected": HH[1]["rejected"].replace("lake", "sea")},
     "field 'rejected': the conversation before its final answer differs from field 'chosen' at turn 2"),
    ({"chosen": HH[0]["chosen"] + "\n\nHuman: And Spain?", "rejected": HH[0]["rejected"]},
     "field 'chosen' ends with a Human turn"),
    ({"chosen": HH[0]["chosen"], "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: "},
     "field 'rejected': the final Assistant turn is empty"),
    ({"chosen": HH[0]["chosen"], "rejected": 3}, "field 'rejected' must be a string"),
])
def test_broken_hh_rlhf_records_name_file_line_and_field(tmp_path, line2, fragment):
    path = write_jsonl(tmp_path / "hh.jsonl", [HH[0], line2])
    with raises_at(path, 2, fragment):
        load_preferences({"source": str(path), "format": "hh_rlhf"}, key="reward.data")


# --------------------------------------------------------------------------- ultrafeedback_binarized

UF = [
    {"prompt": "Name a prime number.", "prompt_id": "a1",
     "chosen": [user("Name a prime number."), assistant("7 is prime.")],
     "rejected": [user("Name a prime number."), assistant("9 is prime.")],
     "messages": [user("Name a prime number."), assistant("7 is prime.")],
     "score_chosen": 9.0, "score_rejected": 2.5},
    {"prompt": "And an even one?", "prompt_id": "b2",
     "chosen": [user("Name a prime number."), assistant("7."), user("And an even one?"), assistant("2.")],
     "rejected": [user("Name a prime number."), assistant("7."), user("And an even one?"), assistant("4.")],
     "messages": [user("Name a prime number."), assistant("7."), user("And an even one?"), assistant("2.")],
     "score_chosen": 8.0, "score_rejected": 1.0},
]


def test_ultrafeedback_pairs_sft_and_prompts(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", UF)
    first, multi = load_preferences(path)
    assert first == {"prompt": [user("Name a prime number.")], "chosen": "7 is prime.", "rejected": "9 is prime.",
                     "margin": None, "where": f"{path} line 1"}
    assert multi["prompt"] == [user("Name a prime number."), assistant("7."), user("And an even one?")]
    assert (multi["chosen"], multi["rejected"]) == ("2.", "4.")
    # The same rows as SFT data are their `messages` (the chosen conversation) ...
    assert load_sft(path) == [UF[0]["messages"], UF[1]["messages"]]
    # ... and as RL prompts their `prompt` string.
    assert [p["prompt"] for p in load_prompts(path, key="ppo.data")] == ["Name a prime number.", "And an even one?"]


@pytest.mark.parametrize("change, fragment", [
    ({"rejected": [user("Name an odd number."), assistant("9 is prime.")]},
     "field 'rejected': the conversation before its final answer differs from field 'chosen' at turn 0"),
    ({"chosen": [user("Name a prime number.")]}, "field 'chosen[0].role' is 'user'; the last message must be"),
    ({"chosen": [assistant("7 is prime.")]}, "field 'chosen' must hold the prompt's messages"),
    ({"rejected": [user("Name a prime number."), {"role": "bot", "content": "9"}]},
     "field 'rejected[1].role' is 'bot'"),
    ({"score_chosen": "high"}, "field 'score_chosen' must be a number, got 'high'"),
])
def test_broken_ultrafeedback_records_name_file_line_and_field(tmp_path, change, fragment):
    path = write_jsonl(tmp_path / "uf.jsonl", [UF[1], {**UF[0], **change}])
    with raises_at(path, 2, fragment):
        load_preferences(path)


def test_ultrafeedback_parquet_reads_like_jsonl_and_names_the_record(tmp_path):
    path = tmp_path / "uf.parquet"
    pd.DataFrame(UF).to_parquet(path)
    assert load_preferences(path) == [{**p, "where": p["where"].replace(".jsonl line", ".parquet record")}
                                      for p in load_preferences(write_jsonl(tmp_path / "uf.jsonl", UF))]
    broken = copy.deepcopy(UF)
    broken[1]["rejected"][0]["content"] = "Name a number."
    pd.DataFrame(broken).to_parquet(path)
    with pytest.raises(LmforgeError, match=rf"^{re.escape(str(path))} record 2: field 'rejected': the conversation "
                                           rf"before its final answer differs from field 'chosen' at turn 0"):
        load_preferences(path)


# --------------------------------------------------------------------------- tatsu-lab/alpaca

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5",
     "text": "Below is an instruction ... ### Response:\n5"},
    {"instruction": "Say hello.", "input": "", "output": "Hello!", "text": "Below is an instruction ..."},
]


def test_alpaca_merges_a_nonempty_input_after_a_blank_line(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    assert detect_format(ALPACA[0], "sft") == "alpaca"  # not its `text` column
    assert load_sft(path) == [[user("Add the numbers.\n\n2 and 3"), assistant("5")],
                              [user("Say hello."), assistant("Hello!")]]


@pytest.mark.parametrize("line2, fragment", [
    ({"instruction": "Say hello.", "input": "", "text": "..."}, "field 'output' is missing"),
    ({"instruction": "Say hello.", "input": ["x"], "output": "Hi"}, "field 'input' must be a string, got list"),
    ({"instruction": "", "input": "", "output": "Hi"}, "field 'instruction' is empty"),
])
def test_broken_alpaca_records_name_file_line_and_field(tmp_path, line2, fragment):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA[0], line2])
    with raises_at(path, 2, fragment):
        load_sft({"source": str(path), "format": "alpaca"})


# --------------------------------------------------------------------------- ShareGPT


def test_sharegpt_multi_turn_with_system_and_broken_role(tmp_path):
    rows = [{"id": "c1", "conversations": [
                {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
            {"id": "c2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "bing", "value": "Hey"}]}]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    [conv] = load_sft({"source": str(path), "max_records": 1})
    assert conv == [system("Be brief."), user("Hi"), assistant("Hello."), user("2+2?"), assistant("4")]
    with raises_at(path, 2, "field 'conversations[1].from' is 'bing' (expected one of human, user, gpt"):
        load_sft(path)


# --------------------------------------------------------------------------- rankings


def test_rankings_and_scores_expand_to_all_ordered_pairs(tmp_path):
    rows = [{"prompt": "q", "responses": ["good", "best", "bad"], "ranks": [2, 1, 3]},
            {"prompt": [user("hi"), assistant("yo"), user("q")], "responses": ["x", "y"], "scores": [0.1, 0.7]}]
    path = write_jsonl(tmp_path / "rank.jsonl", rows)
    pairs = load_preferences(path)
    assert [(p["chosen"], p["rejected"], p["where"]) for p in pairs] == [
        ("best", "good", f"{path} line 1"), ("good", "bad", f"{path} line 1"), ("best", "bad", f"{path} line 1"),
        ("y", "x", f"{path} line 2")]
    assert pairs[3]["prompt"] == rows[1]["prompt"]
    write_jsonl(path, [rows[0], {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [1, 2, 1]}])
    with raises_at(path, 2, "responses 0 and 2 tie at rank 1; a ranking must be strict"):
        load_preferences(path)


# --------------------------------------------------------------------------- openai/gsm8k and math reasoning

GSM8K = [
    {"question": "Tom has 12 apples and gives away half. How many are left?",
     "answer": "Half of 12 is 12/2 = <<12/2=6>>6.\nTom has 12-6 = <<12-6=6>>6 apples left.\n#### 6"},
    {"question": "A farm sells 250 eggs a day for 4 days, then 500 more. How many eggs in all?",
     "answer": "In 4 days it sells 250*4 = <<250*4=1000>>1,000 eggs.\nIn all 1,000+500 = <<1000+500=1500>>1,500.\n"
               "#### 1,500"},
]


def test_gsm8k_becomes_sft_solution_and_verifiable_prompt(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    convs = load_sft(path)
    assert convs[0] == [user(GSM8K[0]["question"]),
                        assistant("Half of 12 is 12/2 = 6.\nTom has 12-6 = 6 apples left.\n\nThe answer is 6.")]
    assert convs[1][1]["content"].endswith("In all 1,000+500 = 1,500.\n\n" + FINAL_ANSWER.format(answer="1500"))
    prompts = load_prompts(path, key="grpo.data")
    assert prompts[0] == {"prompt": GSM8K[0]["question"], "answer": "6", "task": "arithmetic",
                          "where": f"{path} line 1"}
    assert (prompts[1]["answer"], prompts[1]["task"]) == ("1500", "arithmetic")
    # The SFT target is exactly what the verifiable reward accepts, and a wrong final line is not.
    for conv, prompt in zip(convs, prompts):
        assert is_correct(conv[1]["content"], prompt["answer"], prompt["task"])
        wrong = conv[1]["content"].replace(f"is {prompt['answer']}.", f"is {int(prompt['answer']) + 1}.")
        assert not is_correct(wrong, prompt["answer"], prompt["task"])


def test_gsm8k_answer_without_final_line_is_named(tmp_path):
    broken = {"question": "How many?", "answer": "Two and two make 2+2 = <<2+2=4>>4.\nSo four."}
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [GSM8K[0], broken])
    with raises_at(path, 2, "field 'answer' has no '#### <final answer>' line"):
        load_sft(path)
    with raises_at(path, 2, "field 'answer' has no '#### <final answer>' line"):
        load_prompts(path, key="grpo.data")  # a multi-line answer is a solution, never a reference answer
    write_jsonl(path, [GSM8K[0], {"question": "How many?", "answer": "So four.\n#### "}])
    with raises_at(path, 2, "field 'answer' has nothing after '####'"):
        load_sft(path)


def test_math_problem_reasoning_answer(tmp_path):
    rows = [{"problem": "What is 3/4 of 8?", "reasoning": "8 / 4 = 2 and 2 * 3 = 6.", "answer": 6},
            {"problem": "Simplify 6/8.", "reasoning": "Divide both by 2.", "answer": "3/4"}]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    assert load_sft(path) == [[user("What is 3/4 of 8?"), assistant("8 / 4 = 2 and 2 * 3 = 6.\n\nThe answer is 6.")],
                              [user("Simplify 6/8."), assistant("Divide both by 2.\n\nThe answer is 3/4.")]]
    assert [(p["prompt"], p["answer"], p["task"]) for p in load_prompts(path, key="grpo.data")] == [
        ("What is 3/4 of 8?", "6", "arithmetic"), ("Simplify 6/8.", "3/4", "string")]
    write_jsonl(path, [rows[0], {"problem": "x", "reasoning": "y", "answer": [1]}])
    with raises_at(path, 2, "field 'answer' must be a string or a number, got [1]"):
        load_sft(path)


# --------------------------------------------------------------------------- process supervision

PROCESS = [
    {"prompt": "Compute 2*3+4.", "steps": [{"step": "2*3 = 6.", "reward": 1}, {"step": "6+4 = 10.", "reward": 1}]},
    {"problem": "Compute 5*5-1.", "steps": [{"step": "5*5 = 25.", "reward": 1}, {"step": "25-1 = 23.", "reward": -1},
                                            {"step": "So 23.", "reward": 0}]},
    {"prompt": "Compute 9-9.", "steps": [{"step": "9-9 = 1.", "reward": 0.0}, {"step": "So 1.", "reward": 0.0}]},
    {"prompt": "Compute 1+1.", "completions": ["1+1 = 2.", "So 2."], "labels": [True, True]},
]


def test_process_supervision_steps_sft_pairs_and_labels(tmp_path):
    path = write_jsonl(tmp_path / "prm.jsonl", PROCESS)
    labelled = load_process(path)
    assert [ex["rewards"] for ex in labelled] == [[1.0, 1.0], [1.0, -1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    assert labelled[1] == {"prompt": [user("Compute 5*5-1.")], "steps": ["5*5 = 25.", "25-1 = 23.", "So 23."],
                           "rewards": [1.0, -1.0, 0.0], "where": f"{path} line 2"}
    # SFT imitates only traces whose every step is good.
    assert load_sft(path) == [[user("Compute 2*3+4."), assistant("2*3 = 6.\n6+4 = 10.")],
                              [user("Compute 1+1."), assistant("1+1 = 2.\nSo 2.")]]
    # The reward model gets one pair per trace at its first bad step (only line 2 has a good step before one).
    assert load_preferences(path) == [{"prompt": [user("Compute 5*5-1.")], "chosen": "5*5 = 25.",
                                       "rejected": "5*5 = 25.\n25-1 = 23.", "margin": None,
                                       "where": f"{path} line 2"}]
    with pytest.raises(LmforgeError, match=rf"{re.escape(str(path))} line 2: the trace has a step with reward <= 0"):
        to_messages(PROCESS[1], where=f"{path} line 2")


@pytest.mark.parametrize("line2, fragment", [
    ({"prompt": "p", "steps": [{"step": "a", "reward": 1}, {"step": "b", "reward": 1},
                               {"step": "c", "reward": "good"}]},
     "field 'steps[2].reward' must be a number, got 'good'"),
    ({"prompt": "p", "steps": [{"step": "a", "reward": True}]}, "field 'steps[0].reward' must be a number"),
    ({"prompt": "p", "steps": [{"step": "", "reward": 1}]}, "field 'steps[0].step' must be a non-empty string"),
    ({"prompt": "p", "steps": []}, "field 'steps' must be a non-empty list"),
    ({"steps": [{"step": "a", "reward": 1}]}, "field 'prompt' is missing"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [True]}, "field 'labels' must be a list with one label"),
    ({"prompt": "p", "completions": ["a"], "labels": [1]}, "field 'labels[0]' must be true or false"),
])
def test_broken_process_records_name_file_line_and_field(tmp_path, line2, fragment):
    path = write_jsonl(tmp_path / "prm.jsonl", [PROCESS[0], line2])
    for load in (load_process, load_preferences, load_sft):
        with raises_at(path, 2, fragment):
            load(path)


# --------------------------------------------------------------------------- OpenAssistant/oasst1


def oasst_row(mid, parent, role, text, rank=None, **extra):
    """One row with oasst1's columns (those the conversion does not read set to plausible values)."""
    return {"message_id": mid, "parent_id": parent, "user_id": "u", "created_date": "2023-02-05T00:00:00+00:00",
            "text": text, "role": role, "lang": "en", "review_count": 3, "review_result": True, "deleted": False,
            "rank": rank, "synthetic": False, "model_name": None, "detoxify": None, "message_tree_id": "t",
            "tree_state": "ready_for_export", "emojis": None, "labels": None, **extra}


OASST = [
    oasst_row("r1", None, "prompter", "How do I boil an egg?"),
    oasst_row("a1", "r1", "assistant", "Put it in boiling water for 8 minutes.", rank=1),
    oasst_row("a2", "r1", "assistant", "Boil water, add the egg, wait 9 minutes.", rank=0),
    oasst_row("a3", "r1", "assistant", "Eggs cannot be boiled.", rank=2),
    oasst_row("a4", "r1", "assistant", "Withdrawn answer.", rank=None, deleted=True),
    oasst_row("p2", "a2", "prompter", "And a soft one?"),
    oasst_row("a5", "p2", "assistant", "About 6 minutes."),
    oasst_row("r2", None, "prompter", "Name a colour."),
    oasst_row("b1", "r2", "assistant", "Blue."),
    oasst_row("x1", "gone", "assistant", "Reply to a missing message.", rank=0),
]


def test_oasst_rows_become_best_ranked_conversations_and_rankings(tmp_path):
    path = write_jsonl(tmp_path / "oasst.jsonl", OASST)
    assert detect_format(OASST[0], "sft") == "oasst" == detect_format(OASST[0], "preference")
    assert load_sft(path) == [
        [user("How do I boil an egg?"), assistant("Boil water, add the egg, wait 9 minutes."), user("And a soft one?"),
         assistant("About 6 minutes.")],
        [user("Name a colour."), assistant("Blue.")]]
    pairs = load_preferences(path)
    best, good, bad = (OASST[i]["text"] for i in (2, 1, 3))
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(best, good), (good, bad), (best, bad)]
    assert all(p["prompt"] == [user("How do I boil an egg?")] and p["where"] == f"{path} line 1" for p in pairs)


def test_oasst_broken_row_is_named(tmp_path):
    path = write_jsonl(tmp_path / "oasst.jsonl", [OASST[0], {**OASST[1], "role": "bot"}])
    with raises_at(path, 2, "field 'role' is 'bot' (expected one of prompter, assistant)"):
        load_sft(path)
    write_jsonl(path, [OASST[0], {"prompt": "not a tree row", "completion": "x"}])
    with raises_at(path, 2, "field 'message_id' is missing"):
        load_preferences(path)
    write_jsonl(path, [OASST[0]])
    with pytest.raises(LmforgeError, match=r"the oasst rows of .* hold no answered prompt"):
        load_sft(path)


def test_oasst_records_from_memory():
    numbered = [(f"rows record {i}", row) for i, row in enumerate(OASST, start=1)]
    [(where, ranking)] = oasst_records(numbered, "preference")
    assert where == "rows record 1" and ranking["ranks"] == [2, 1, 3]


# --------------------------------------------------------------------------- detection and sources


@pytest.mark.parametrize("record, kind, expected", [
    ({"messages": UF[0]["messages"], "prompt": "x", "chosen": UF[0]["chosen"], "rejected": UF[0]["rejected"]},
     "sft", "messages"),
    (UF[0], "preference", "ultrafeedback"),
    (UF[0], "prompt", "prompt"),
    (HH[0], "preference", "hh_rlhf"),
    (HH[0], "prompt", "hh_rlhf"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference", "pair"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1, 2]}, "preference", "ranking"),
    (ALPACA[0], "sft", "alpaca"),
    ({"conversations": []}, "sft", "sharegpt"),
    ({"instruction": "i", "response": "r"}, "sft", "instruction_response"),
    ({"prompt": "p", "completion": "c"}, "sft", "prompt_completion"),
    ({"text": "t"}, "sft", "text"),
    (GSM8K[0], "sft", "gsm8k"),
    (GSM8K[0], "prompt", "gsm8k"),
    ({"question": "2+2?", "answer": "4"}, "prompt", "prompt"),
    ({"problem": "p", "reasoning": "r", "answer": "1"}, "sft", "math"),
    ({"problem": "p", "answer": "1"}, "prompt", "math"),
    (PROCESS[0], "sft", "process"),
    (PROCESS[3], "preference", "process"),
    (OASST[0], "sft", "oasst"),
    (OASST[0], "prompt", None),
    ({"foo": 1}, "sft", None),
])
def test_detection_from_keys(record, kind, expected):
    assert detect_format(record, kind) == expected


def test_format_override_and_wrong_kind(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "Say hi.", "completion": "hi", "text": "unused"}])
    assert load_sft({"source": str(path), "format": "text"}) == [[assistant("unused")]]
    with pytest.raises(LmforgeError,
                       match=r"^sft\.data: format 'pair' cannot be read as SFT data \(formats: auto, oasst"):
        load_sft({"source": str(path), "format": "pair"})
    with pytest.raises(LmforgeError, match=r"^grpo\.data: format 'oasst' cannot be read as prompt data"):
        load_prompts({"source": "openai/gsm8k", "format": "oasst"}, key="grpo.data")  # before any download


def test_hub_dataset_rows_are_named_by_source_split_and_record(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, subset=None, *, split, revision, streaming):
        calls.append((name, subset, split, revision, streaming))
        rows = datasets.Dataset.from_list(GSM8K + [{"question": "q", "answer": "no final line"}])
        return rows.to_iterable_dataset() if streaming else rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    spec = {"source": "openai/gsm8k", "subset": "main", "split": "test", "format": "gsm8k", "max_records": 2}
    assert [p["answer"] for p in load_prompts(spec, key="grpo.data")] == ["6", "1500"]
    with pytest.raises(LmforgeError, match=r"^openai/gsm8k \(main, train\) record 3: field 'answer' has no '####"):
        load_sft({"source": "openai/gsm8k", "subset": "main", "revision": "abc123"})
    assert calls == [("openai/gsm8k", "main", "test", None, True), ("openai/gsm8k", "main", "train", "abc123", False)]

    def offline(*args, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LmforgeError, match=r"^dpo\.data: could not load Anthropic/hh-rlhf \(train\) from the Hugging "
                                           r"Face Hub: ConnectionError: no network"):
        load_preferences("Anthropic/hh-rlhf", key="dpo.data")


@pytest.mark.parametrize("value, fragment", [
    ({"source": "openai/gsm8k", "splt": "train"}, "unknown keys ['splt']"),
    ({"split": "train"}, "missing 'source'"),
    ({"source": "openai/gsm8k", "max_records": 0}, "max_records: must be at least 1"),
    ({"source": "openai/gsm8k", "max_records": True}, "max_records: expected int or null, got bool"),
    ({"source": "data/x.jsonl", "subset": "main"}, "subset and revision apply only to Hub datasets"),
    (3, "expected a file path, a Hub dataset id or a mapping, got int"),
])
def test_data_spec_errors_name_the_key(value, fragment):
    with pytest.raises(LmforgeError, match=rf"^sft\.data[.:].*{re.escape(fragment)}"):
        parse_data_spec(value, "sft.data")


def test_data_file_is_the_local_file_a_data_value_names(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", ALPACA)
    assert data_file(str(path)) == str(path) and data_file({"source": str(path), "format": "alpaca"}) == str(path)
    assert data_file("tatsu-lab/alpaca") is None and data_file(None) is None


# --------------------------------------------------------------------------- config and presets


def test_schema_lists_every_format():
    spec = load_schema()["$defs"]["stage_data"]
    assert spec["properties"]["format"]["enum"] == ["auto", *FORMATS]
    assert sorted({f for names in KINDS.values() for f in names}) == sorted(FORMATS)


def test_stage_data_specs_validate_in_the_config():
    cfg = apply_schema({"grpo": {"data": {"source": "openai/gsm8k", "subset": "main", "format": "gsm8k"}},
                        "sft": {"data": "data/chat.jsonl"}})
    assert cfg["grpo"]["data"]["subset"] == "main" and cfg["sft"]["data"] == "data/chat.jsonl"
    assert cfg["dpo"]["data"] is None
    with pytest.raises(LmforgeError, match=r"config key 'sft\.data\.format': 'gsm' is not allowed"):
        apply_schema({"sft": {"data": {"source": "openai/gsm8k", "format": "gsm"}}})
    with pytest.raises(LmforgeError, match=r"unknown config key\(s\) 'splits' in 'dpo\.data'"):
        apply_schema({"dpo": {"data": {"source": "x/y", "splits": "train"}}})


def _merge(base: dict, over: dict) -> dict:
    """Snakemake's --configfile order: later files update earlier ones, section by section."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("*.yaml")))
def test_every_preset_loads_and_its_data_specs_fit_their_stage(preset):
    cfg = load_config(PRESETS / preset)
    raw = yaml.safe_load((PRESETS / preset).read_text())
    if preset.startswith("hub-"):
        # Recipes are overlays on the GPU model preset; the combination must pass every cross-field check.
        check_config(_merge(yaml.safe_load((PRESETS / "gpu-125m.yaml").read_text()), raw))
    for section, kind in STAGES_WITH_DATA.items():
        if section in cfg and cfg[section]["data"] is not None:
            spec = parse_data_spec(cfg[section]["data"], f"{section}.data")
            check_format(spec.format, kind, spec.key)
            assert not spec.is_file  # presets name Hub datasets only, so they run from a fresh clone


def test_presets_cover_the_recommended_hub_datasets():
    named = set()
    for path in PRESETS.glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        named |= {s["source"] if isinstance(s, dict) else s.split("|")[0].strip()
                  for s in (cfg.get("data") or {}).get("sources", [])}
        named |= {cfg[s]["data"]["source"] for s in STAGES_WITH_DATA
                  if isinstance((cfg.get(s) or {}).get("data"), dict)}
    assert {"HuggingFaceFW/fineweb-edu", "HuggingFaceTB/smoltalk2", "OpenAssistant/oasst1", "tatsu-lab/alpaca",
            "HuggingFaceH4/ultrachat_200k", "Anthropic/hh-rlhf", "HuggingFaceH4/ultrafeedback_binarized",
            "openai/gsm8k"} <= named
