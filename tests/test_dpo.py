"""DPO: losses and metrics against hand-computed values, config rules, the cached reference, the stage end to end."""
import json
import math

import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.config import apply_schema
from lmforge.errors import LmforgeError
from lmforge.loader import load_model
from lmforge.model import ModelConfig, RewardModel, Transformer
from lmforge.stages import dpo as stage
from lmforge.tokenizer import LMTokenizer
from lmforge.train.dpo import (DPOBatches, dpo_loss, dpo_metrics, encode_dpo_pairs, hinge_loss, ipo_loss,
                               preference_loss, reference_logprobs, sigmoid_loss)
from lmforge.workflow import StageEnv

TEXT = ("What is 37 + 48? 37 + 48 = 85. Reverse the word 'apple'. The reverse of 'apple' is 'elppa'. "
        "Write 'garden' in capital letters. Sort the letters of 'pickle' alphabetically. I don't know. ")
BUILTIN = {"n_sft": 4, "n_pref": 12, "n_rl": 4, "n_val": 6, "tasks": {"arithmetic": 1.0, "string": 1.0, "docstring": 0}}
SEQ = 48
TRL_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")


@pytest.fixture(scope="module")
def tok():
    return LMTokenizer.train([TEXT * 3, TEXT.lower(), TEXT.upper()] * 20, vocab_size=320)


def tiny_model(tok, seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SEQ)
    return Transformer(ModelConfig(**{**cfg, **overrides})).eval()


def save_lm(path, model, tok, kind="causal_lm"):
    cfg = (model.trunk if kind == "reward_model" else model).cfg.to_dict()
    save_model(path, model, kind=kind, model_config=cfg, tokenizer=tok, meta={"stage": "sft"})
    return str(path)


def pairs(n):
    return [{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}],
             "chosen": f"{i} + {i + 1} = {2 * i + 1}.",
             "rejected": "I don't know." if i % 2 else "apple " * (1 + i % 3),
             "margin": None, "where": f"pairs.jsonl line {i + 1}"} for i in range(n)]


def logp_alone(model, prompt: list[int], response: list[int]) -> float:
    """log p(response | prompt) of one unpadded sequence, token by token."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].float(), -1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(response))


# --------------------------------------------------------------------------- losses and metrics


def test_losses_against_hand_computed_values():
    # h = (1.0 - (-1.0)) = 2 and (-0.5 - 0.5) = -1; beta 0.5 -> beta*h = 1 and -0.5.
    c, r = torch.tensor([1.0, -0.5]), torch.tensor([-1.0, 0.5])
    sig = preference_loss(c, r, beta=0.5)
    assert sig.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(1 + math.exp(0.5))], abs=1e-6)
    assert sig.tolist() == pytest.approx([0.3132617, 0.9740770], abs=1e-6)
    smooth = preference_loss(c, r, beta=0.5, label_smoothing=0.2)
    assert smooth.tolist() == pytest.approx([0.8 * math.log(1 + math.exp(-1)) + 0.2 * math.log(1 + math.exp(1)),
                                             0.8 * math.log(1 + math.exp(0.5)) + 0.2 * math.log(1 + math.exp(-0.5))],
                                            abs=1e-6)
    # IPO on per-token log-ratios, target 1 / (2 * 0.5) = 1. Length 1: (2 - 1)^2 = 1, (-1 - 1)^2 = 4;
    # chosen 2 tokens, rejected 4: (0.5 + 0.25 - 1)^2, (-0.25 - 0.125 - 1)^2.
    one = torch.ones(2)
    assert preference_loss(c, r, beta=0.5, loss_type="ipo", chosen_len=one, rejected_len=one).tolist() == \
        pytest.approx([1.0, 4.0])
    assert preference_loss(c, r, beta=0.5, loss_type="ipo", chosen_len=2 * one, rejected_len=4 * one).tolist() == \
        pytest.approx([0.25 ** 2, 1.375 ** 2])
    with pytest.raises(ValueError, match="lengths"):
        preference_loss(c, r, beta=0.5, loss_type="ipo")
    # hinge: relu(1 - 1) = 0, relu(1 + 0.5) = 1.5.
    assert preference_loss(c, r, beta=0.5, loss_type="hinge").tolist() == pytest.approx([0.0, 1.5])
    h = torch.tensor([0.3])
    assert sigmoid_loss(h, 2.0).item() == pytest.approx(math.log(1 + math.exp(-0.6)), abs=1e-6)
    assert ipo_loss(h, 2.0).item() == pytest.approx((0.3 - 0.25) ** 2, abs=1e-7)
    assert hinge_loss(h, 2.0).item() == pytest.approx(0.4, abs=1e-7)


def test_dpo_metrics_against_hand_computed_values():
    m = dpo_metrics(torch.tensor([-3.0, -5.0]), torch.tensor([-6.0, -4.0]), torch.tensor([-4.0, -5.0]),
                    torch.tensor([-5.0, -4.0]), beta=0.5)
    # rewards chosen 0.5*[1, 0] = [0.5, 0]; rejected 0.5*[-1, 0] = [-0.5, 0]; the tie counts as wrong.
    assert m == pytest.approx({"rewards/chosen": 0.25, "rewards/rejected": -0.25, "rewards/margins": 0.5,
                               "rewards/accuracies": 0.5, "logps/chosen": -4.0, "logps/rejected": -5.0})


# --------------------------------------------------------------------------- config rules


def test_dpo_section_batches_and_beta():
    from lmforge.sections import DPOConfig

    cfg = DPOConfig.from_dict(apply_schema({"dpo": {"batch_size": 4, "grad_accum_steps": 4}})["dpo"], "dpo")
    assert (cfg.batch_size, cfg.grad_accum_steps, cfg.beta) == (4, 4, 0.5)  # 16 pairs per step; beta's default
    with pytest.raises(LmforgeError, match=r"^config key 'dpo.label_smoothing' \(0.1\) applies only to loss_type "
                                           r"sigmoid or simpo, not 'hinge'$"):
        DPOConfig.from_dict(apply_schema({"dpo": {"label_smoothing": 0.1, "loss_type": "hinge"}})["dpo"], "dpo")


# --------------------------------------------------------------------------- encoding, reference cache, loss


def test_encoding_splits_prompt_and_responses(tok):
    ps = pairs(3)
    for p, e in zip(ps, encode_dpo_pairs(tok, ps, SEQ)):
        assert e.prompt == tok.render_prompt(p["prompt"])
        assert e.chosen == tok.encode(p["chosen"]) + [tok.end_id]
        assert e.rejected == tok.encode(p["rejected"]) + [tok.end_id]
    long = [{**ps[0], "prompt": [{"role": "user", "content": TEXT}]}]
    with pytest.raises(LmforgeError, match=r"^pairs.jsonl line 1: the prompt is \d+ tokens, but model.max_seq_len"):
        encode_dpo_pairs(tok, long, SEQ)


class Counting(torch.nn.Module):
    """A model wrapper that counts forward calls and the rows they carry."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.rows = inner, 0, 0

    def forward(self, ids, **kw):
        self.calls += 1
        self.rows += ids.shape[0]
        return self.inner(ids, **kw)


def test_reference_logps_computed_once_per_pair_and_loss_uses_the_cache(tok):
    examples = encode_dpo_pairs(tok, pairs(7), SEQ)
    ref = Counting(tiny_model(tok, seed=1))
    table = reference_logprobs(ref, examples, batch_size=3, pad_id=tok.pad_id)
    assert (ref.calls, ref.rows) == (3, 14)  # ceil(7 / 3) forwards, each pair's two rows once
    for e, (c, r) in zip(examples, table.tolist()):  # padded and length-sorted batches = each alone
        assert c == pytest.approx(logp_alone(ref.inner, e.prompt, e.chosen), abs=1e-4)
        assert r == pytest.approx(logp_alone(ref.inner, e.prompt, e.rejected), abs=1e-4)

    policy = tiny_model(tok, seed=2)
    batches = DPOBatches(examples, table, batch_size=4, pad_id=tok.pad_id, seed=0)
    for step in range(3):
        batch = batches.batch(step)
        loss, metrics = dpo_loss(policy, batch, beta=0.2)
        idx = batch["index"].tolist()
        lc = torch.tensor([logp_alone(policy, examples[i].prompt, examples[i].chosen) for i in idx])
        lr = torch.tensor([logp_alone(policy, examples[i].prompt, examples[i].rejected) for i in idx])
        expected = preference_loss(lc - table[idx, 0], lr - table[idx, 1], beta=0.2).mean()
        assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
        assert metrics["logps/chosen"] == pytest.approx(lc.mean().item(), abs=1e-4)
        assert metrics["tokens"] == sum(2 * len(examples[i].prompt) + len(examples[i].chosen)
                                        + len(examples[i].rejected) for i in idx)
        # RPO: plus alpha times the chosen answers' NLL, one mean over all their tokens.
        rpo, rpo_metrics = dpo_loss(policy, batch, beta=0.2, rpo_alpha=0.5)
        nll = -lc.sum() / sum(len(examples[i].chosen) for i in idx)
        assert rpo.item() == pytest.approx(expected.item() + 0.5 * nll.item(), abs=1e-4)
        assert rpo_metrics["nll_loss"] == pytest.approx(nll.item(), abs=1e-4) and "nll_loss" not in metrics
    assert (ref.calls, ref.rows) == (3, 14)  # training never runs the reference
    # Batches are a pure function of (step, micro).
    again = DPOBatches(examples, table, batch_size=4, pad_id=tok.pad_id, seed=0)
    assert again.batch(2)["index"].tolist() == batches.batch(2)["index"].tolist()


def test_reference_scores_only_the_pairs_a_run_reads_and_repeats_once(tok):
    examples = encode_dpo_pairs(tok, pairs(6), SEQ)
    examples = examples + examples[:2] * 3  # on-policy pairs repeated into a mix: 12 pairs, 6 distinct
    full = reference_logprobs(tiny_model(tok, seed=1), examples, batch_size=4, pad_id=tok.pad_id)
    batches = DPOBatches(examples, None, batch_size=4, pad_id=tok.pad_id, seed=0)
    needed = batches.needed(steps=2, eval_limit=1)  # 2 shuffled batches of 4 + the first 4 in data order
    assert {0, 1, 2, 3} <= needed and needed == {0, 1, 2, 3} | set(sum(
        (DPOBatches(examples, full, batch_size=4, pad_id=tok.pad_id, seed=0).batch(s)["index"].tolist()
         for s in range(2)), []))
    ref = Counting(tiny_model(tok, seed=1))
    table = reference_logprobs(ref, examples, batch_size=4, pad_id=tok.pad_id, only=needed)
    distinct = {(tuple(examples[i].prompt), tuple(examples[i].chosen), tuple(examples[i].rejected)) for i in needed}
    assert ref.rows == 2 * len(distinct) < 2 * len(needed)
    for i in range(len(examples)):
        if i in needed:
            torch.testing.assert_close(table[i], full[i])
        else:
            assert torch.isnan(table[i]).all()
    batches.set_reference(table)
    assert not torch.isnan(batches.batch(1)["ref_chosen"]).any()


def test_training_on_one_pair_raises_its_margin(tok):
    examples = encode_dpo_pairs(tok, pairs(1), SEQ)
    policy = tiny_model(tok, seed=3).train()
    table = reference_logprobs(policy, examples, batch_size=1, pad_id=tok.pad_id)
    batches = DPOBatches(examples, table, batch_size=1, pad_id=tok.pad_id, seed=0)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    margins = []
    for step in range(6):
        loss, metrics = dpo_loss(policy, batches.batch(step), beta=0.1)
        margins.append(metrics["rewards/margins"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert margins[0] == pytest.approx(0.0, abs=1e-5)  # the policy starts as its own reference
    assert margins[-1] > margins[0] + 0.05 and all(b > a for a, b in zip(margins, margins[1:]))


# --------------------------------------------------------------------------- the stage


def stage_params(**dpo):
    section = apply_schema({"dpo": {"warmup_steps": 1, "max_steps": 3, "batch_size": 2, "grad_accum_steps": 2,
                                    "eval_every": 2, "checkpoint_every": 2, "log_every": 1, "eval_steps": 2,
                                    **dpo}})["dpo"]
    return {"dpo": section, "data": {"builtin": BUILTIN}, "seed": 3, "code": "test"}


def run_stage(tmp_path, inputs, **dpo):
    out = tmp_path / "out"
    env = StageEnv(stage="dpo", device="cpu", threads=1, tracking_enabled=False, ckpt_root=str(tmp_path / "ck"))
    outputs = {"model": str(out / "model.pt"), "metrics": str(out / "metrics.json")}
    return stage.run(stage_params(**dpo), inputs, outputs, env), out


@pytest.mark.integration
def test_stage_end_to_end_with_a_separate_reference(tmp_path, tok, monkeypatch):
    sft = save_lm(tmp_path / "sft.pt", tiny_model(tok, seed=4), tok)
    ref_path = save_lm(tmp_path / "ref.pt", tiny_model(tok, seed=5), tok)
    seen = {}
    real_load = stage.load_reference

    def counting_reference(*args, **kw):
        seen["model"] = Counting(real_load(*args, **kw)).eval()
        seen["model"].cfg = seen["model"].inner.cfg
        return seen["model"]

    monkeypatch.setattr(stage, "load_reference", counting_reference)
    metrics, out = run_stage(tmp_path, {"policy": sft, "reference": ref_path})

    ref = seen["model"]
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.inner.training
    n_train, n_val = metrics["n_train"], metrics["n_val"]
    assert n_train + metrics["n_skipped"] == BUILTIN["n_pref"] and n_val + metrics["n_val_skipped"] == BUILTIN["n_val"]
    assert ref.rows == 2 * (n_train + n_val)  # every pair scored once by the reference, never again
    assert ref.calls == math.ceil(n_train / 2) + math.ceil(n_val / 2)

    saved = json.loads((out / "metrics.json").read_text())
    for key in (*TRL_NAMES, "loss", "val_loss", "val_accuracy", "val_margin", "n_train", "beta", "loss_type",
                "steps", "wall_s", "samples"):
        assert key in saved, key
    assert saved["steps"] == 3 and saved["beta"] == 0.5 and saved["loss_type"] == "sigmoid"
    assert 0 <= saved["val_accuracy"] <= 1 and 1 <= len(saved["samples"]) <= 5
    assert [h["step"] for h in saved["history"]] == [2, 3]
    model, _, ckpt = load_model(out / "model.pt")
    assert ckpt["kind"] == "causal_lm" and ckpt["meta"]["stage"] == "dpo"
    start, _, _ = load_model(sft)
    assert any((a - b).abs().max() > 0 for a, b in zip(model.state_dict().values(), start.state_dict().values()))


@pytest.mark.integration
def test_stage_without_reference_uses_sft_and_resumes(tmp_path, tok):
    sft = save_lm(tmp_path / "sft.pt", tiny_model(tok, seed=4), tok)
    first, _ = run_stage(tmp_path, {"policy": sft}, loss_type="ipo", beta=0.5)
    assert first["beta"] == 0.5 and first["loss_type"] == "ipo" and first["resumed_from"] is None
    # The same config again resumes the finished run (the reference is still the SFT model): nothing to train.
    again, _ = run_stage(tmp_path, {"policy": sft}, loss_type="ipo", beta=0.5)
    assert again["resumed_from"] == 3 and again["steps"] == 3
    # Another max_steps is another schedule, and another loss (the RPO weight) another run: both start fresh.
    longer, _ = run_stage(tmp_path, {"policy": sft}, loss_type="ipo", beta=0.5, max_steps=4)
    assert longer["resumed_from"] is None and longer["steps"] == 4
    other, _ = run_stage(tmp_path, {"policy": sft}, loss_type="ipo", beta=0.5, max_steps=4, rpo_alpha=1.0)
    assert other["resumed_from"] is None and other["steps"] == 4


def test_reference_with_another_tokenizer_or_vocab_is_refused(tmp_path, tok):
    sft = save_lm(tmp_path / "sft.pt", tiny_model(tok, seed=4), tok)
    other_tok = LMTokenizer.train([TEXT.lower() * 5] * 20, vocab_size=300)
    other = save_lm(tmp_path / "other.pt", tiny_model(other_tok, seed=4), other_tok)
    with pytest.raises(LmforgeError, match=rf"^config key 'dpo.reference': {other} has tokenizer "
                                           rf"{other_tok.sha256[:12]}.*the policy {sft} has tokenizer "
                                           rf"{tok.sha256[:12]}"):
        run_stage(tmp_path, {"policy": sft, "reference": other})
    wide = save_lm(tmp_path / "wide.pt", tiny_model(tok, seed=4, vocab_size=tok.vocab_size + 8), tok)
    with pytest.raises(LmforgeError, match=rf"'dpo.reference': {wide} .*vocab_size {tok.vocab_size + 8}, "
                                           rf"but the policy .*vocab_size {tok.vocab_size}"):
        run_stage(tmp_path, {"policy": sft, "reference": wide})


def test_reward_model_as_policy_is_refused(tmp_path, tok):
    rm = save_lm(tmp_path / "rm.pt", RewardModel(tiny_model(tok)), tok, kind="reward_model")
    with pytest.raises(LmforgeError, match=r"rm.pt: is a reward_model checkpoint, but a causal language model"):
        run_stage(tmp_path, {"policy": rm})


def test_stage_config_errors_come_before_any_work(tmp_path, tok):
    with pytest.raises(LmforgeError, match=r"'dpo.warmup_steps' \(5\) must be smaller than 'dpo.max_steps' \(3\)"):
        run_stage(tmp_path, {"policy": "missing.pt"}, warmup_steps=5)
    with pytest.raises(LmforgeError, match=r"'dpo.label_smoothing' \(0.1\) applies only to"):
        run_stage(tmp_path, {"policy": "missing.pt"}, label_smoothing=0.1, loss_type="ipo")


@pytest.mark.parametrize("source", ["data", "on_policy", "mixed"])
@pytest.mark.integration
def test_stage_trains_on_a_pair_file_or_on_policy_pairs(tmp_path, tok, source):
    sft = save_lm(tmp_path / "sft.pt", tiny_model(tok, seed=4), tok)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p["prompt"][0]["content"], "chosen": p["chosen"],
                                        "rejected": p["rejected"]}) + "\n" for p in pairs(5)))
    if source == "data":
        metrics, _ = run_stage(tmp_path, {"policy": sft, "data": str(path)}, data=str(path))
    else:
        metrics, _ = run_stage(tmp_path, {"policy": sft, "pairs": str(path)}, on_policy=True)
    if source == "mixed":  # the 5 file pairs are static; the same 5 on-policy: share 0.5 -> repeated once
        metrics, _ = run_stage(tmp_path, {"policy": sft, "data": str(path), "pairs": str(path)}, data=str(path),
                               on_policy="mixed", on_policy_share=0.5)
        assert metrics["n_train"] == 10
    else:
        assert metrics["n_train"] == 5
    assert metrics["n_val"] >= 1 and metrics["steps"] == 3


def test_mixed_pairs_repeat_the_on_policy_ones_to_their_share():
    static, on_policy = [{"s": i} for i in range(300)], [{"o": i} for i in range(20)]
    mixed = stage.mix(static, on_policy, 0.35)  # 0.35/0.65 * 300/20 = 8.08 -> 8 repeats
    assert len(mixed) == 300 + 160 and mixed[:300] == static and mixed[300:] == on_policy * 8
    assert len(stage.mix(static, on_policy, 0.01)) == 320  # never fewer than one copy


@pytest.mark.parametrize("on_policy", [True, "mixed"])
@pytest.mark.integration
def test_on_policy_pairs_without_the_scored_file_is_an_error(tmp_path, tok, on_policy):
    sft = save_lm(tmp_path / "sft.pt", tiny_model(tok, seed=4), tok)
    with pytest.raises(LmforgeError, match=rf"^config key 'dpo.on_policy' is {on_policy}, but no scored pairs file"):
        run_stage(tmp_path, {"policy": sft}, on_policy=on_policy)


@pytest.mark.integration
@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_load_and_run_no_reference(tmp_path, tok, monkeypatch, loss_type):
    sft = save_lm(tmp_path / "sft.pt", tiny_model(tok, seed=4), tok)
    monkeypatch.setattr(stage, "reference_logprobs", lambda *a, **k: pytest.fail("a reference forward"))
    monkeypatch.setattr(stage, "load_reference", lambda *a, **k: pytest.fail("a reference load"))
    ref = save_lm(tmp_path / "ref.pt", tiny_model(tok, seed=5), tok)  # named, and never loaded
    metrics, out = run_stage(tmp_path, {"policy": sft, "reference": ref}, loss_type=loss_type, rpo_alpha=0.0)
    assert metrics["loss_type"] == loss_type and metrics["steps"] == 3 and metrics["reference_s"] < 1
    assert 0 <= metrics["val_accuracy"] <= 1
