"""SFT encoding, packing vs padding, the masked loss; reward pairs, Bradley-Terry loss and metrics."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, RewardModel, Transformer
from lmforge.tokenizer import LMTokenizer
from lmforge.train.reward import (PairBatches, PairExample, bradley_terry_loss, encode_pairs, evaluate_reward,
                                  pair_batch, reward_loss, reward_metrics)
from lmforge.train.sft import (IGNORE, SFTBatches, encode_conversations, evaluate_sft, pack, packed_batch,
                               padded_batch, sft_loss)

WORDS = "apple river stone cloud seven twelve reverse word answer sum the of is what add and".split()


@pytest.fixture(scope="module")
def tok():
    texts = [" ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 9)) for i in range(200)]
    return LMTokenizer.train(texts, vocab_size=300)


def conversation(i: int) -> list[dict]:
    """Deterministic conversations of varied lengths, some multi-turn."""
    q = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 5))
    a = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(1 + (2 * i) % 7))
    conv = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if i % 3 == 0:
        conv = [{"role": "system", "content": "be brief"}, *conv,
                {"role": "user", "content": "and " + q}, {"role": "assistant", "content": "the " + a}]
    return conv


def tiny_model(tok, seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return Transformer(ModelConfig(**{**cfg, **overrides})).eval()


def reference_loss(model, examples) -> float:
    """Each conversation alone, unbatched: sum of CE over its masked targets / number of masked targets."""
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.ids])
        logits = model(ids[:, :-1])[0]
        for t in range(len(ex.ids) - 1):
            if ex.mask[t + 1]:
                total += F.cross_entropy(logits[t], torch.tensor(ex.ids[t + 1]), reduction="sum").item()
                count += 1
    return total / count


# --------------------------------------------------------------------------- encoding


def test_mask_covers_assistant_content_and_end_only(tok):
    conv = conversation(3)  # system, user, assistant, user, assistant
    [ex], n_trunc = encode_conversations(tok, [conv], max_seq_len=128)
    assert n_trunc == 0 and (ex.ids, ex.mask) == tok.render_chat(conv)
    trained = [t for t, m in zip(ex.ids, ex.mask) if m]
    expected = [t for m in conv if m["role"] == "assistant" for t in tok.encode(m["content"]) + [tok.end_id]]
    assert trained == expected
    # targets: the next token where it is trained, IGNORE elsewhere.
    assert ex.targets() == [t if m else IGNORE for t, m in zip(ex.ids[1:], ex.mask[1:])]
    [all_ex], _ = encode_conversations(tok, [conv], max_seq_len=128, train_on_all=True)
    assert all_ex.ids == ex.ids and all(all_ex.mask)


def test_truncation_count_and_dropping(tok):
    convs = [conversation(i) for i in range(12)]
    lengths = [len(tok.render_chat(c)[0]) for c in convs]
    limit = sorted(lengths)[6]
    examples, n_trunc = encode_conversations(tok, convs, max_seq_len=limit)
    assert n_trunc == sum(n > limit + 1 for n in lengths) > 0
    assert all(len(e.ids) <= limit + 1 for e in examples)
    # A conversation whose prompt alone fills the window keeps no trained token: dropped, still counted.
    long_prompt = [{"role": "user", "content": " ".join(WORDS * 4)}, {"role": "assistant", "content": "ok"}]
    examples, n_trunc = encode_conversations(tok, [long_prompt, conversation(1)], max_seq_len=16)
    assert n_trunc == 1 and len(examples) == 1


# --------------------------------------------------------------------------- packing vs padding


def test_pack_places_every_example_once_within_rows(tok):
    examples, _ = encode_conversations(tok, [conversation(i) for i in range(40)], max_seq_len=64)
    rows = pack(examples, 64)
    assert sorted(i for r in rows for i in r) == list(range(40))
    assert all(sum(examples[i].n_positions for i in r) <= 64 for r in rows)
    # Best-fit decreasing needs at most one row more than the total length demands.
    assert len(rows) <= math.ceil(sum(e.n_positions for e in examples) / 64) + 1
    with pytest.raises(ValueError, match="more than seq_len"):
        pack(examples, 4)


@pytest.mark.parametrize("pe", ["rope", "alibi", "learned"])
def test_packed_loss_equals_padded_loss_equals_each_alone(tok, pe):
    model = tiny_model(tok, positional_encoding=pe)
    examples, _ = encode_conversations(tok, [conversation(i) for i in range(14)], max_seq_len=64)
    rows = pack(examples, 64)
    assert any(len(r) > 1 for r in rows)  # the test must really pack
    with torch.no_grad():
        packed, _ = sft_loss(model, packed_batch(examples, rows, 64, tok.pad_id))
        padded, _ = sft_loss(model, padded_batch(examples, range(len(examples)), tok.pad_id))
    ref = reference_loss(model, examples)
    assert packed.item() == pytest.approx(ref, abs=1e-5)
    assert padded.item() == pytest.approx(ref, abs=1e-5)


def test_packed_batch_layout(tok):
    examples, _ = encode_conversations(tok, [conversation(i) for i in (1, 2, 4)], max_seq_len=64)
    b = packed_batch(examples, [[0, 1, 2]], 64, tok.pad_id)
    n = [e.n_positions for e in examples]
    assert b["doc_ids"][0].tolist() == [0] * n[0] + [1] * n[1] + [2] * n[2] + [-1] * (64 - sum(n))
    assert b["position_ids"][0, :sum(n)].tolist() == [*range(n[0]), *range(n[1]), *range(n[2])]
    assert b["input_ids"][0, n[0]:n[0] + n[1]].tolist() == examples[1].ids[:-1]
    assert (b["targets"][0, sum(n):] == IGNORE).all()
    with pytest.raises(ValueError, match="row 0 needs"):
        packed_batch(examples, [[0, 1, 2]], 40, tok.pad_id)


def test_loss_ignores_prompt_tokens_and_counts_real_tokens(tok):
    model = tiny_model(tok)
    examples, _ = encode_conversations(tok, [conversation(i) for i in range(4)], max_seq_len=64)
    batch = padded_batch(examples, range(4), tok.pad_id)
    loss, metrics = sft_loss(model, batch)
    assert metrics["tokens"] == sum(e.n_positions for e in examples)
    # Changing a prompt token's target changes nothing: it carries no loss.
    x = batch["input_ids"]
    logits = model(x)
    keep = batch["targets"] != IGNORE
    manual = F.cross_entropy(logits[keep], batch["targets"][keep])
    assert loss.item() == pytest.approx(manual.item(), abs=1e-6)
    assert keep.sum().item() == sum(sum(e.mask[1:]) for e in examples)

    class LogitsOnly(torch.nn.Module):  # a model without hidden_states/lm_head takes the generic path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, **kw):
            return self.inner(ids, **kw)

    generic, _ = sft_loss(LogitsOnly(model), batch)
    assert generic.item() == pytest.approx(loss.item(), abs=1e-6)


@pytest.mark.parametrize("packing", [True, False])
def test_batches_are_pure_cover_each_epoch_and_reshuffle(tok, packing):
    examples, _ = encode_conversations(tok, [conversation(i) for i in range(30)], max_seq_len=64)
    make = lambda: SFTBatches(examples, seq_len=64, batch_size=3, pad_id=tok.pad_id, seed=5,
                              packing=packing, grad_accum_steps=2)
    a, b = make(), make()
    # Pure in (step, micro): any call order, any instance.
    late = a.batch(7, 1)
    for s in range(3):
        a.batch(s, 0)
    assert torch.equal(late["input_ids"], b.batch(7, 1)["input_ids"])
    assert not torch.equal(a.batch(0, 0)["input_ids"], a.batch(0, 1)["input_ids"])

    # One epoch = per_epoch micro-batches of batch_size units; with one conversation per
    # row, its rows are all distinct conversations.
    epoch0 = [a.batch(*divmod(g, 2)) for g in range(a.per_epoch)]
    assert sum(b["input_ids"].shape[0] for b in epoch0) == a.per_epoch * a.batch_size
    assert all(("doc_ids" in b) == packing for b in epoch0)
    if not packing:
        rows = [tuple(r[r != tok.pad_id].tolist()) for b in epoch0 for r in b["input_ids"]]
        assert len(set(rows)) == len(rows)
    first = a.batch(0, 0)["input_ids"]
    again = a.batch(*divmod(a.per_epoch, 2))["input_ids"]  # first batch of epoch 1
    assert first.shape != again.shape or not torch.equal(first, again)


def test_evaluate_sft_matches_reference(tok):
    model = tiny_model(tok)
    examples, _ = encode_conversations(tok, [conversation(i) for i in range(10)], max_seq_len=64)
    for packing in (True, False):
        batches = SFTBatches(examples, seq_len=64, batch_size=3, pad_id=tok.pad_id, seed=0, packing=packing)
        assert evaluate_sft(model, batches)["val_loss"] == pytest.approx(reference_loss(model, examples), abs=1e-5)


# --------------------------------------------------------------------------- reward


def test_bradley_terry_loss_against_hand_computed_values():
    rc, rr = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    # diffs 1 and -1: -log sigmoid(d) = log(1 + e^-d)
    plain = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert plain == pytest.approx(0.8132617, abs=1e-6)
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(plain, abs=1e-6)
    # margin 0.5: diffs 0.5 and -1.5
    with_margin = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.5))) / 2
    assert bradley_terry_loss(rc, rr, margin=0.5).item() == pytest.approx(with_margin, abs=1e-6)
    assert bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 0.5])).item() == pytest.approx(with_margin, abs=1e-6)
    # centering: (rc + rr)^2 = 9 and 4, mean 6.5
    assert bradley_terry_loss(rc, rr, center_coef=0.1).item() == pytest.approx(plain + 0.65, abs=1e-6)
    assert bradley_terry_loss(rc, rr, margin=torch.tensor([1.0, 0.0]), center_coef=0.01).item() == pytest.approx(
        (math.log(2) + math.log(1 + math.exp(1))) / 2 + 0.065, abs=1e-6)


def test_reward_metrics_against_hand_computed_values():
    m = reward_metrics(torch.tensor([2.0, 0.5, 1.0]), torch.tensor([1.0, 1.5, 1.0]))
    values = [2.0, 0.5, 1.0, 1.0, 1.5, 1.0]
    mean = sum(values) / 6
    assert m["accuracy"] == pytest.approx(1 / 3)  # the tie counts as wrong
    assert m["margin"] == pytest.approx(0.0)
    assert m["reward_mean"] == pytest.approx(mean)
    assert m["reward_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 6))


def pairs_for_test(n):
    return [{"prompt": [{"role": "user", "content": " ".join(WORDS[i % 7:i % 7 + 2 + i % 3])}],
             "chosen": " ".join(WORDS[i % 5:i % 5 + 1 + i % 4]), "rejected": WORDS[(i + 3) % len(WORDS)],
             "margin": None, "where": f"pairs.jsonl line {i + 1}"} for i in range(n)]


def test_encode_pairs_uses_the_chat_template_and_truncates(tok):
    pairs = pairs_for_test(4)
    examples = encode_pairs(tok, pairs, max_seq_len=64)
    for p, e in zip(pairs, examples):
        assert e.chosen == tok.render_chat(p["prompt"] + [{"role": "assistant", "content": p["chosen"]}])[0]
        assert e.rejected == tok.render_chat(p["prompt"] + [{"role": "assistant", "content": p["rejected"]}])[0]
        assert not e.truncated
    long = [{**pairs[0], "chosen": " ".join(WORDS * 3)}]
    prompt_len = len(tok.render_prompt(long[0]["prompt"]))
    [e] = encode_pairs(tok, long, max_seq_len=prompt_len + 3)
    assert e.truncated and len(e.chosen) == prompt_len + 3


def test_encode_pairs_prompt_too_long_names_pair_and_lengths(tok):
    pair = {**pairs_for_test(1)[0], "prompt": [{"role": "user", "content": " ".join(WORDS * 3)}]}
    n = len(tok.render_prompt(pair["prompt"]))
    with pytest.raises(LmforgeError, match=rf"^pairs.jsonl line 1: the prompt is {n} tokens, but "
                                           rf"model.max_seq_len is 16"):
        encode_pairs(tok, [pair], max_seq_len=16)
    del pair["where"]
    with pytest.raises(LmforgeError, match=r"^preference pair 0: the prompt is"):
        encode_pairs(tok, [pair], max_seq_len=16)


def test_reward_loss_equals_scoring_each_sequence_alone(tok):
    torch.manual_seed(0)
    model = RewardModel(tiny_model(tok)).eval()
    with torch.no_grad():
        model.score_head.weight.normal_()  # a non-trivial head so scores differ
    examples = encode_pairs(tok, pairs_for_test(5), max_seq_len=64)
    examples[1].margin = 0.7
    batch = pair_batch(examples, tok.pad_id)
    assert batch["input_ids"].shape[0] == 10 and batch["margin"].tolist() == pytest.approx([0, 0.7, 0, 0, 0])
    assert batch["key_padding_mask"].sum(1).tolist() == [len(e.chosen) for e in examples] + [
        len(e.rejected) for e in examples]
    with torch.no_grad():
        loss, metrics = reward_loss(model, batch, center_coef=0.05)
        rc = torch.stack([model(torch.tensor([e.chosen]))[0] for e in examples])
        rr = torch.stack([model(torch.tensor([e.rejected]))[0] for e in examples])
    margin = torch.tensor([0, 0.7, 0, 0, 0])
    expected = (-F.logsigmoid(rc - rr - margin)).mean() + 0.05 * ((rc + rr) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["accuracy"] == pytest.approx((rc > rr).float().mean().item())
    assert metrics["margin"] == pytest.approx((rc - rr).mean().item(), abs=1e-5)
    assert metrics["tokens"] == sum(len(e.chosen) + len(e.rejected) for e in examples)
    val = evaluate_reward(model, PairBatches(examples, batch_size=2, pad_id=tok.pad_id, seed=0), center_coef=0.05)
    assert val["val_loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert set(val) == {"val_loss", "val_accuracy", "val_margin", "val_reward_mean", "val_reward_std"}


def test_pair_batches_are_pure_and_cover_each_epoch():
    examples = [PairExample([1, 2, i + 3], [1, 2]) for i in range(10)]
    a = PairBatches(examples, batch_size=3, pad_id=0, seed=9)
    b = PairBatches(examples, batch_size=3, pad_id=0, seed=9)
    late = a.batch(5)
    a.batch(0)
    assert torch.equal(late["input_ids"], b.batch(5)["input_ids"])
    chosen_last = [int(x) for s in range(a.per_epoch) for x in a.batch(s)["input_ids"][:3, 2]]
    assert len(set(chosen_last)) == 9  # 3 batches of 3 distinct pairs, no repeats within an epoch
    batch = a.batch(0)
    assert batch["key_padding_mask"][3:].sum(dim=1).tolist() == [2, 2, 2] and batch["margin"] is None
