"""The BPE tokenizer and the chat format: ids, loss mask, and agreement with transformers' chat template."""

import random

import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer import (
    BOS, END, EOS, PAD, ROLE_TOKENS, SPECIAL_TOKENS, LMTokenizer, bytes_per_token,
)

WORDS = ("the a cat dog fox bird sat ran jumped flew over under on in near big small red blue green quick "
         "lazy happy tired house garden river tree morning evening because while and but then every "
         "little old young bright dark cold warm window table street").split()

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Where did the cat sit?"},
    {"role": "assistant", "content": "The cat sat on the mat."},
    {"role": "user", "content": " And the dog?\nTell me — briefly."},
    {"role": "assistant", "content": "Under the tree, café-side."},
]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> LMTokenizer:
    return LMTokenizer.train(sentences(400), vocab_size=400, min_frequency=2)


def test_vocab_size_and_special_tokens(tok):
    assert 300 < tok.vocab_size <= 400
    ids = [tok.tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == len(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.end_id) == tuple(tok.tok.token_to_id(t) for t in (PAD, BOS, EOS, END))
    assert tok.role_ids == {r: tok.tok.token_to_id(t) for r, t in ROLE_TOKENS.items()}


def test_encode_decode_round_trip(tok):
    for text in [*sentences(20, seed=1), "Unseen wörds & ümlauts — 123!\n\ttabs", " leading space", ""]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(["the cat", "a dog"]) == [tok.encode("the cat"), tok.encode("a dog")]


def test_training_merges_frequent_words(tok):
    # A trained BPE uses fewer tokens than bytes on text like its training data.
    text = " ".join(sentences(50, seed=2))
    assert len(tok.encode(text)) < 0.6 * len(text.encode())


def test_document_wraps_bos_eos(tok):
    ids = tok.encode("the cat")
    assert tok.document(ids) == [tok.bos_id, *ids, tok.eos_id]


def test_special_tokens_skipped_on_decode(tok):
    ids, _ = tok.render_chat(CONVERSATION[1:3])
    assert tok.decode(ids) == "Where did the cat sit?The cat sat on the mat."
    assert tok.decode(ids, skip_special_tokens=False).startswith(BOS + ROLE_TOKENS["user"] + "Where")


def expected_chat(tok: LMTokenizer, messages) -> tuple[list[int], list[int]]:
    """The format written out by hand: BOS, then per message role token + content + END."""
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        content = tok.encode(m["content"])
        ids += [tok.role_ids[m["role"]]] + content + [tok.end_id]
        train = m["role"] == "assistant"
        mask += [0] + [1 if train else 0] * (len(content) + 1)
    return ids, mask


def test_render_chat_ids_and_mask(tok):
    ids, mask = tok.render_chat(CONVERSATION)
    assert (ids, mask) == expected_chat(tok, CONVERSATION)
    # The masked tokens are exactly the assistant replies, each followed by END.
    picked = [i for i, m in zip(ids, mask) if m]
    answers = [tok.encode(m["content"]) + [tok.end_id] for m in CONVERSATION if m["role"] == "assistant"]
    assert picked == answers[0] + answers[1]
    # Nothing of the system / user turns, and no role token, is trained on.
    assert sum(mask) == sum(len(a) for a in answers)
    assert all(m == 0 for i, m in zip(ids, mask) if i in tok.role_ids.values() or i == tok.bos_id)


def test_render_prompt_ends_with_assistant(tok):
    msgs = CONVERSATION[:2]
    ids = tok.render_prompt(msgs)
    assert ids[-1] == tok.role_ids["assistant"]
    assert ids[:-1] == tok.render_chat(msgs)[0]
    assert tok.prompt_ids("Hi") == [tok.bos_id, tok.role_ids["user"], *tok.encode("Hi"), tok.end_id,
                                    tok.role_ids["assistant"]]


def test_bad_role_and_missing_content(tok):
    with pytest.raises(LmforgeError, match=r"sample 7: message 1 has role 'bot'") as e:
        tok.render_chat([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}], where="sample 7")
    assert "system, user, assistant" in str(e.value)
    with pytest.raises(LmforgeError, match=r"conversation: message 0 has no text 'content'"):
        tok.render_chat([{"role": "user"}])
    with pytest.raises(LmforgeError, match="message 0 has no text"):
        tok.render_prompt([{"role": "user", "content": None}])


def test_transformers_chat_template_matches(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert hf.bos_token_id == tok.bos_id and hf.pad_token_id == tok.pad_id and hf.eos_token_id == tok.end_id

    def hf_ids(messages, add_generation_prompt):
        out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        # transformers 5 returns a BatchEncoding (return_dict defaults to True); 4.x returned a list.
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    assert hf_ids(CONVERSATION, False) == tok.render_chat(CONVERSATION)[0]
    assert hf_ids(CONVERSATION[:4], True) == tok.render_prompt(CONVERSATION[:4])
    # And the plain tokenizer agrees too.
    text = "The quick fox — naïve café."
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "t")
    for where in (tmp_path / "t", tmp_path / "t" / "tokenizer.json"):
        again = LMTokenizer.load(where)
        assert again.sha256 == tok.sha256
        assert again.render_chat(CONVERSATION) == tok.render_chat(CONVERSATION)


def test_load_missing_and_broken_files(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(LmforgeError, match="tokenizer file not found") as e:
        LMTokenizer.load(missing)
    assert str(missing) in str(e.value)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(LmforgeError, match="not a valid tokenizer.json") as e:
        LMTokenizer.load(tmp_path)
    assert str(bad) in str(e.value)


def test_bytes_per_token_by_hand(tok):
    texts = ["The cat sat.", "naïve — café", "a"]
    n_bytes = len(b"The cat sat.") + len("naïve — café".encode("utf-8")) + 1
    assert n_bytes == 12 + 16 + 1
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    assert bytes_per_token(tok, texts) == pytest.approx(n_bytes / n_tokens)
    assert bytes_per_token(tok, []) == 0.0


def test_split_digits_gives_every_digit_its_own_token(tmp_path):
    from transformers import PreTrainedTokenizerFast

    texts = [f"{s} costs {n} and {n * 7} more." for s in sentences(300, seed=3) for n in (12, 345, 6789)]
    merged = LMTokenizer.train(texts, vocab_size=400)
    split = LMTokenizer.train(texts, vocab_size=400, split_digits=True)
    number = "It costs 6789, not 12."
    assert any(sum(c.isdigit() for c in t) > 1 for t in merged.tok.encode(number).tokens)  # BPE merged digits
    pieces = split.tok.encode(number).tokens
    assert [t for t in pieces if any(c.isdigit() for c in t)] == list("678912")
    for text in (number, " -40 + 1.5e3", "x1y22"):
        assert split.decode(split.encode(text)) == text
    split.save(tmp_path)  # the pre-tokenizer travels in tokenizer.json: transformers splits the same way
    assert PreTrainedTokenizerFast.from_pretrained(tmp_path).encode(number, add_special_tokens=False) == split.encode(number)
