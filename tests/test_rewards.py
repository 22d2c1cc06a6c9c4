"""lmforge.rewards: the spec's checks, the combined reward by hand, the tokenizer guard, external HF classifiers."""
import json
import math

import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.data.formats import load_prompts
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, RewardModel, Transformer
from lmforge.rewards import RewardFunction, RewardSpec
from lmforge.tokenizer import LMTokenizer

WORDS = "what is two add three the sum five seven apple reverse word answer of and".split()
KEY = "score.reward_fn"


def train_tokenizer(words, vocab_size=300) -> LMTokenizer:
    texts = [" ".join(words[(i * k) % len(words)] for k in range(1, 9)) + f" {i} {i * 7}" for i in range(200)]
    return LMTokenizer.train(texts, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(WORDS)


def save_reward_model(path, tok, seed=0) -> RewardModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    rm = RewardModel(Transformer(cfg)).eval()
    save_model(path, rm, kind="reward_model", model_config=cfg.to_dict(), tokenizer=tok, meta={})
    return rm


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("weights", [{}, {"rm": 0, "verifiable": 0, "hf": 0}])
def test_spec_without_any_weight_is_an_error(weights):
    with pytest.raises(LmforgeError, match=r"config key 'score\.reward_fn': every weight .* is 0"):
        RewardSpec.from_dict(weights, KEY)


def test_spec_hf_needs_a_model():
    with pytest.raises(LmforgeError, match=r"'score\.reward_fn\.hf_model' is required when 'score\.reward_fn\.hf'"):
        RewardSpec.from_dict({"rm": 0, "hf": 0.5, "hf_model": None}, KEY)
    spec = RewardSpec.from_dict({"rm": 1.0, "verifiable": 0.5, "hf": 0.0, "hf_model": None}, KEY)
    assert (spec.rm, spec.verifiable, spec.hf, spec.hf_model) == (1.0, 0.5, 0.0, None)


def test_check_prompts_names_the_key_and_the_record(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"prompt": "what is two add three", "answer": 5},
                                                       {"prompt": "reverse the word apple"}]) + "\n")
    records = load_prompts(path, key="score.data")
    RewardSpec(rm=1.0).check_prompts(records, str(path), KEY)  # no verifiable weight: answers not needed
    with pytest.raises(LmforgeError, match=rf"'score\.reward_fn\.verifiable' is 1\.0, but 1 of 2 prompts .*"
                                           rf"first: {path} line 2"):
        RewardSpec(verifiable=1.0).check_prompts(records, str(path), KEY)
    with pytest.raises(LmforgeError, match=r"'score\.reward_fn\.partial' is 0\.5, but 1 of 2 prompts .*"
                                           r"or set 'score\.reward_fn\.partial: 0'"):
        RewardSpec(partial=0.5).check_prompts(records, str(path), KEY)


# --------------------------------------------------------------------------- the trained reward model


def test_combined_reward_is_the_weighted_sum(tok, tmp_path):
    path = tmp_path / "rm.pt"
    rm = save_reward_model(path, tok)
    records = [{"prompt": "what is two add three", "answer": "5", "task": "arithmetic"},
               {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is seven"}],
                "answer": "7", "task": "arithmetic"},
               {"prompt": "reverse the word apple", "answer": None, "task": "string"}]
    responses = ["the sum is 5", "the answer is 8", "elppa"]
    fn = RewardFunction(RewardSpec(rm=0.5, verifiable=2.0), policy_tokenizer=tok, reward_model_path=path)
    out = fn(records, responses)

    # By hand: each prompt + response + <|end|> alone through the reward model.
    prompts = [tok.prompt_ids(records[0]["prompt"]), tok.render_prompt(records[1]["prompt"]),
               tok.prompt_ids(records[2]["prompt"])]
    with torch.no_grad():
        rm_ref = [rm(torch.tensor([p + tok.encode(r) + [tok.end_id]])).item() for p, r in zip(prompts, responses)]
    assert out.rm.tolist() == pytest.approx(rm_ref, abs=1e-5)
    assert out.correct[:2].tolist() == [1.0, 0.0] and math.isnan(out.correct[2].item())
    expected = [0.5 * rm_ref[0] + 2.0, 0.5 * rm_ref[1], 0.5 * rm_ref[2]]
    assert out.reward.tolist() == pytest.approx(expected, abs=1e-5)
    assert out.hf is None

    # Given ids are scored as given (a response cut before <|end|> is read without one).
    ids = [tok.encode(r) for r in responses]
    with torch.no_grad():
        cut = [rm(torch.tensor([p + i])).item() for p, i in zip(prompts, ids)]
    assert fn(records, responses, response_ids=ids).rm.tolist() == pytest.approx(cut, abs=1e-5)


def test_partial_credit_adds_the_share_of_true_equations(tok):
    fn = RewardFunction(RewardSpec(verifiable=1.0, partial=0.5), policy_tokenizer=tok)
    records = [{"prompt": "What is 47 + 38?", "answer": "85", "task": "arithmetic"}] * 3 + [
        {"prompt": "Reverse the word 'apple'.", "answer": "elppa", "task": "string"}]
    responses = ["7 + 8 = 15, 4 + 3 + 1 = 8, so 85.",   # right, both steps true
                 "7 + 8 = 15, 4 + 3 + 0 = 8, so 85.",   # right answer, one false step
                 "I don't know.",                      # no equation at all
                 "The reverse of 'apple' is 'elpap'."]  # 3 of 5 letters in place
    out = fn(records, responses)
    assert out.correct.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out.partial.tolist() == pytest.approx([1.0, 0.5, 0.0, 0.6])
    assert out.reward.tolist() == pytest.approx([1.5, 1.25, 0.0, 0.3])


def test_verifiable_only_loads_no_model(tok):
    fn = RewardFunction(RewardSpec(verifiable=1.0), policy_tokenizer=tok)
    assert fn.reward_model is None and fn.hf_model is None
    out = fn([{"prompt": "what is two add three", "answer": "5", "task": "arithmetic"}], ["5"])
    assert out.reward.tolist() == [1.0] and out.rm is None


def test_reward_model_from_another_tokenizer_is_refused(tok, tmp_path):
    other = train_tokenizer(["zebra", "quartz", "violin", "marble", "tundra", "oxygen"], vocab_size=280)
    path = tmp_path / "rm_other.pt"
    save_reward_model(path, other)
    with pytest.raises(LmforgeError, match=rf"the reward model {path} was trained with a different tokenizer"):
        RewardFunction(RewardSpec(rm=1.0), policy_tokenizer=tok, reward_model_path=path)
    with pytest.raises(LmforgeError, match=r"'score\.reward_fn\.rm' is 1\.0, but no reward model checkpoint"):
        RewardFunction(RewardSpec(rm=1.0), policy_tokenizer=tok, key=KEY)


# --------------------------------------------------------------------------- external Hugging Face classifiers

HF_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>", *WORDS, "be", "brief", "5", "8", "elppa"]
HF_RECORDS = [{"prompt": "what is two add three"},
              {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is seven"}]},
              {"prompt": "reverse the word apple"}]
HF_RESPONSES = ["the sum is 5", "8", "elppa and the answer is elppa"]
HF_PROMPT_TEXTS = ["what is two add three", "be brief\nwhat is seven", "reverse the word apple"]


def word_ids(text: str) -> list[int]:
    return [HF_WORDS.index(w) for w in text.split()]


def hf_tokenizer(*, bert: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(HF_WORDS)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if not bert:  # a decoder classifier's tokenizer: no specials around the pair, no pad token
        return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="</s>",
                                       model_input_names=["input_ids", "attention_mask"])
    t.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_input_names=["input_ids", "token_type_ids",
                                                                         "attention_mask"])


def test_hf_classifier_scores_are_its_logits(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(HF_WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=1, pad_token_id=0,
                     initializer_range=0.5)  # scores far enough apart that a mix-up of rows would show
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path)
    hf_tokenizer(bert=True).save_pretrained(tmp_path)

    fn = RewardFunction(RewardSpec(hf=1.5, hf_model=str(tmp_path)), policy_tokenizer=None, key=KEY)
    out = fn(HF_RECORDS, HF_RESPONSES)
    # By hand, one unpadded row at a time: [CLS] prompt [SEP] response [SEP], segment 1 for the response.
    ref = []
    with torch.no_grad():
        for prompt, response in zip(HF_PROMPT_TEXTS, HF_RESPONSES):
            a, b = word_ids(prompt), word_ids(response)
            ids = torch.tensor([[2, *a, 3, *b, 3]])
            segments = torch.tensor([[0] * (len(a) + 2) + [1] * (len(b) + 1)])
            ref.append(model(input_ids=ids, token_type_ids=segments).logits[0, 0].item())
    assert max(ref) - min(ref) > 0.1
    assert out.hf.tolist() == pytest.approx(ref, abs=1e-5)
    assert out.reward.tolist() == pytest.approx([1.5 * r for r in ref], abs=1e-5)
    assert out.rm is None and out.correct is None


def test_decoder_classifier_without_pad_token(tmp_path):
    """A Llama-style classifier shipped without a pad token still scores batches (pad = eos)."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(HF_WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, num_labels=1,
                      initializer_range=0.5)
    assert cfg.pad_token_id is None
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path)
    hf_tokenizer(bert=False).save_pretrained(tmp_path)

    out = RewardFunction(RewardSpec(hf=1.0, hf_model=str(tmp_path)), policy_tokenizer=None)(HF_RECORDS, HF_RESPONSES)
    with torch.no_grad():
        ref = [model(input_ids=torch.tensor([word_ids(p) + word_ids(r)])).logits[0, 0].item()
               for p, r in zip(HF_PROMPT_TEXTS, HF_RESPONSES)]
    assert max(ref) - min(ref) > 0.1
    assert out.hf.tolist() == pytest.approx(ref, abs=1e-5)


def test_hf_classifier_with_two_labels_is_refused(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=len(HF_WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    hf_tokenizer(bert=True).save_pretrained(tmp_path)
    with pytest.raises(LmforgeError, match=r"'score\.reward_fn\.hf_model': .* has 2 labels; a reward model has "
                                           r"exactly 1"):
        RewardFunction(RewardSpec(hf=1.0, hf_model=str(tmp_path)), policy_tokenizer=None, key=KEY)


def test_hf_classifier_that_cannot_be_loaded(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(LmforgeError, match=r"'score\.reward_fn\.hf_model': cannot load .* as a sequence-classif"):
        RewardFunction(RewardSpec(hf=1.0, hf_model=str(tmp_path / "nothing")), policy_tokenizer=None, key=KEY)
