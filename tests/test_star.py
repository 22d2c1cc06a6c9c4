"""STaR: the keep-only-correct filter, config errors, and the stage end to end on a tiny model."""
import json

import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.config import apply_schema
from lmforge.errors import LmforgeError
from lmforge.loader import load_model
from lmforge.model import ModelConfig, Transformer
from lmforge.stages import star as star_stage
from lmforge.tokenizer import LMTokenizer
from lmforge.train import star as star_lib
from lmforge.train.star import StarConfig, conversation, keep_correct
from lmforge.workflow import StageEnv

BUILTIN = {"n_sft": 4, "n_pref": 4, "n_rl": 24, "n_val": 10}


# --------------------------------------------------------------------------- the filter


ADD = {"prompt": "What is 37 + 48?", "answer": "85", "task": "arithmetic"}
REV = {"prompt": "Reverse the word 'apple'.", "answer": "elppa", "task": "string"}


def test_keep_correct_keeps_distinct_finished_correct_samples():
    records = [ADD, ADD, ADD, ADD, ADD, REV, REV]
    responses = ["37 + 48 = 85.",          # correct: kept
                 "37 + 48 = 84.",          # wrong: dropped
                 "37 + 48 = 85.",          # the same correct string again: dropped
                 "37 + 48 = 85. So 85.",   # another correct wording: kept
                 "37 + 48 = 85. 85 85",    # correct but never stopped: dropped
                 "The reverse of 'apple' is 'elppa'.",   # correct: kept
                 "The reverse of 'apple' is 'apple'."]   # wrong: dropped
    finished = [True, True, True, True, False, True, True]
    seen = set()
    kept, n_correct = keep_correct(records, responses, finished, seen)
    assert n_correct == 5  # every verified-correct sample, before the finished/duplicate filter
    assert [(k["prompt"], k["response"]) for k in kept] == [
        (ADD["prompt"], "37 + 48 = 85."), (ADD["prompt"], "37 + 48 = 85. So 85."),
        (REV["prompt"], "The reverse of 'apple' is 'elppa'.")]
    assert kept[0] == {"prompt": ADD["prompt"], "response": "37 + 48 = 85.", "task": "arithmetic", "answer": "85"}
    assert len(seen) == 3
    # A later round: what was kept before is not kept again; a new correct answer is.
    again, n_again = keep_correct([ADD, ADD], ["37 + 48 = 85.", "It is 85."], [True, True], seen)
    assert n_again == 2 and [k["response"] for k in again] == ["It is 85."]


def test_the_same_response_to_two_prompts_is_two_samples():
    other = {**ADD, "prompt": "Add 37 and 48."}
    kept, _ = keep_correct([ADD, other], ["37 + 48 = 85."] * 2, [True, True], set())
    assert [k["prompt"] for k in kept] == [ADD["prompt"], other["prompt"]]


def test_conversation_of_a_single_message_and_a_message_list():
    assert conversation({"prompt": "Hi?", "response": "Hello."}) == [
        {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert conversation({"prompt": turns, "response": "Hello."}) == [*turns, {"role": "assistant", "content": "Hello."}]


# --------------------------------------------------------------------------- config


def section(**overrides) -> dict:
    """A complete star config section (schema defaults) with overrides."""
    return apply_schema({"star": overrides})["star"]


def test_rounds_below_one_is_an_error_naming_the_key():
    with pytest.raises(LmforgeError, match=r"config key 'star.rounds'"):
        apply_schema({"star": {"rounds": 0}})
    with pytest.raises(LmforgeError, match=r"^config key 'star.rounds' is 0; it must be at least 1$"):
        StarConfig.from_dict({**section(), "rounds": 0}, key="star")


def test_schema_defaults_fill_the_star_config():
    cfg = StarConfig.from_dict(section(samples_per_prompt=3), "star")
    assert (cfg.rounds, cfg.samples_per_prompt, cfg.n_prompts, cfg.temperature) == (3, 3, 256, 1.0)


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def tok():
    texts = [f"What is {i} + {i % 7}? {i} + {i % 7} = {i + i % 7}. Reverse the word 'apple'." for i in range(300)]
    return LMTokenizer.train(texts, vocab_size=320)


@pytest.fixture
def policy(tmp_path, tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                    max_seq_len=48))
    path = tmp_path / "sft.pt"
    save_model(path, model, kind="causal_lm", model_config=model.cfg.to_dict(), tokenizer=tok, meta={})
    return path


def stage_run(tmp_path, policy, inputs=None, **star):
    params = {"star": section(**{"rounds": 2, "n_prompts": 3, "samples_per_prompt": 2, "max_new_tokens": 6,
                                 "batch_size": 2, "warmup_steps": 0, "max_steps": 2, "checkpoint_every": 2, "log_every": 1, **star}),
              "data": {"builtin": BUILTIN}, "seed": 7}
    outputs = {"model": str(tmp_path / "star" / "model.pt"), "metrics": str(tmp_path / "star" / "metrics.json")}
    env = StageEnv(stage="star", seed=7, device="cpu", threads=1, tracking_enabled=False,
                   ckpt_root=str(tmp_path / "ck"))
    return star_stage.run(params, {"policy": str(policy), **(inputs or {})}, outputs, env), outputs


def weights(path):
    return load_model(path)[0].state_dict()


@pytest.fixture
def lenient(monkeypatch):
    """Every non-empty sample counts as correct and finished, so an untrained model has something to train on."""
    monkeypatch.setattr(star_lib, "is_correct", lambda response, answer, task: bool(response.strip()))
    monkeypatch.setattr(star_stage, "keep_correct",
                        lambda records, responses, finished, seen: keep_correct(records, responses,
                                                                                [True] * len(finished), seen))


@pytest.fixture
def train_calls(monkeypatch):
    """The weights the model holds each time a round's training starts."""
    calls = []
    real = star_stage.train

    def recording(model, **kw):
        calls.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, **kw)

    monkeypatch.setattr(star_stage, "train", recording)
    return calls


@pytest.mark.integration
def test_stage_writes_model_and_per_round_metrics(tmp_path, policy, lenient, train_calls):
    metrics, outputs = stage_run(tmp_path, policy)
    on_disk = json.loads(open(outputs["metrics"]).read())
    rounds = on_disk["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and len(on_disk["history"]) == 2
    for r in rounds:
        assert r["n_sampled"] == 3 * 2 and 0 < r["n_kept"] <= r["n_correct"] <= r["n_sampled"]
        assert r["steps"] == 2 and r["train_loss"] < r["train_loss_start"]
        assert 0 <= r["heldout"]["accuracy"] <= 1 and 0 <= r["heldout"]["dismissive_rate"] <= 1
    # The training set accumulates over rounds.
    assert rounds[1]["n_train"] == rounds[0]["n_kept"] + rounds[1]["n_kept"] == on_disk["n_train"]
    assert on_disk["steps"] == 4 and on_disk["accuracy"] == rounds[-1]["heldout"]["accuracy"]
    assert on_disk["heldout"]["n"] + on_disk["heldout"]["n_skipped"] == BUILTIN["n_val"]
    assert set(on_disk["heldout"]) >= {"sft", "star"}
    ckpt_model, _, ckpt = load_model(outputs["model"])
    assert ckpt["meta"]["stage"] == "star" and ckpt["meta"]["step"] == 4
    # Every round restarts from the SFT weights (round 2 samples from round 1's model, but trains from SFT).
    start = weights(policy)
    assert len(train_calls) == 2
    assert all(torch.equal(call[k], start[k]) for call in train_calls for k in start)
    assert any(not torch.equal(v, start[k]) for k, v in ckpt_model.state_dict().items())


@pytest.mark.integration
def test_a_rerun_resumes_each_finished_round_to_the_same_model(tmp_path, policy, lenient):
    first, outputs = stage_run(tmp_path, policy)
    before = weights(outputs["model"])
    again, _ = stage_run(tmp_path, policy)
    assert [r["n_kept"] for r in again["rounds"]] == [r["n_kept"] for r in first["rounds"]]
    after = weights(outputs["model"])
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.integration
def test_nothing_correct_leaves_the_sft_model(tmp_path, policy):
    # An untrained model answers nothing right: no round has anything to train on.
    metrics, outputs = stage_run(tmp_path, policy)
    assert [(r["n_kept"], r["steps"], r["train_loss"]) for r in metrics["rounds"]] == [(0, 0, None)] * 2
    start, published = weights(policy), weights(outputs["model"])
    assert all(torch.equal(start[k], published[k]) for k in start)


@pytest.mark.integration
def test_prompts_without_reference_answers_fail_before_any_model_is_loaded(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Say hello."}\n{"prompt": "What is 1 + 1?", "answer": "2"}\n')
    with pytest.raises(LmforgeError, match=r"^star.data: 1 of 2 prompts in .*prompts.jsonl have no reference answer "
                                           r"\(first: .*prompts.jsonl line 1\); STaR keeps only"):
        stage_run(tmp_path, tmp_path / "no-such-model.pt", inputs={"data": str(data)}, data=str(data))
    assert not (tmp_path / "star" / "model.pt").exists()


def test_rounds_below_one_fails_in_the_stage_too(tmp_path, policy):
    params_section = {**section(), "rounds": 0}
    env = StageEnv(stage="star", device="cpu", threads=1, tracking_enabled=False, ckpt_root=str(tmp_path / "ck"))
    with pytest.raises(LmforgeError, match=r"'star.rounds' is 0"):
        star_stage.run({"star": params_section, "data": {"builtin": BUILTIN}, "seed": 7}, {"policy": str(policy)},
                       {"model": str(tmp_path / "m.pt"), "metrics": str(tmp_path / "m.json")}, env)
