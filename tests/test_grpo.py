"""GRPO: group advantages, clipping, loss aggregation, rollouts, config errors, and the stage end to end."""
import json
import math

import pytest
import torch

from lmforge import evaluate
from lmforge.checkpoint import save_model
from lmforge.config import apply_schema
from lmforge.data.builtin import make_task_data
from lmforge.errors import LmforgeError
from lmforge.loader import load_model
from lmforge.model import ModelConfig, Transformer
from lmforge.rewards import Rewards
from lmforge.stages import grpo as grpo_stage
from lmforge.tokenizer import LMTokenizer
from lmforge.train.grpo import (GRPOConfig, aggregate, clipped_surrogate, group_advantages, grpo_loss,
                                process_advantages, response_steps,
                                informative_groups, k3_kl, make_rollout)
from lmforge.train.policy import completion_batch, token_logprobs
from lmforge.workflow import StageEnv

BUILTIN = {"n_sft": 4, "n_pref": 4, "n_rl": 24, "n_val": 10}


@pytest.fixture(scope="module")
def tok():
    texts = [f"What is {i} + {i % 7}? {i} + {i % 7} = {i + i % 7}. Reverse the word 'apple'." for i in range(300)]
    return LMTokenizer.train(texts, vocab_size=320)


def tiny_model(tok, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                   max_seq_len=48))


def section(**overrides) -> dict:
    """A complete grpo config section (schema defaults) with overrides."""
    return apply_schema({"grpo": overrides})["grpo"]


# --------------------------------------------------------------------------- advantages


REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])  # two groups of four


def test_group_advantages_against_hand_numbers():
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); group 2: mean 0.25, std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    s1, s2 = math.sqrt(1 / 3), 0.5
    centred = [0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75]
    expected_group = [c / (s1 + 1e-4) for c in centred[:4]] + [c / (s2 + 1e-4) for c in centred[4:]]
    # batch: mean 3/8; unbiased var = (3 * 0.625^2 + 5 * 0.375^2) / 7
    sb = math.sqrt((3 * 0.625 ** 2 + 5 * 0.375 ** 2) / 7)
    torch.testing.assert_close(group_advantages(REWARDS, 4, "group"), torch.tensor(expected_group))
    torch.testing.assert_close(group_advantages(REWARDS, 4, "batch"), torch.tensor([c / (sb + 1e-4) for c in centred]))
    torch.testing.assert_close(group_advantages(REWARDS, 4, "none"), torch.tensor(centred))


def test_a_group_with_equal_rewards_has_zero_advantage():
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2, "group")
    assert adv[:2].tolist() == [0.0, 0.0] and adv[2] < 0 < adv[3]


def test_process_advantages_sum_the_normalised_rewards_of_the_steps_ahead():
    """DeepSeekMath's process supervision: r~ = (r - mean) / std over the group's steps, and token t
    gets the sum of r~ over its response's steps that end at or after t."""
    steps = [[(1, 1.0), (3, 0.0)], [(0, 1.0), (2, 1.0)], [], [(2, 0.0)]]  # two groups of two
    # group 1: rewards 1, 0, 1, 1 (mean 0.75, unbiased std 0.5); group 2 has one step only: nothing to compare
    r = [0.25, -0.75, 0.25, 0.25]
    expected = torch.tensor([[r[0] + r[1], r[0] + r[1], r[1], r[1], 0.0],
                             [r[2] + r[3], r[3], r[3], 0.0, 0.0],
                             [0.0] * 5, [0.0] * 5])
    torch.testing.assert_close(process_advantages(steps, 2, 5, "none"), expected)
    torch.testing.assert_close(process_advantages(steps, 2, 5, "group"), expected / (0.5 + 1e-4))
    batch_std = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]).std().item()
    torch.testing.assert_close(process_advantages(steps, 2, 5, "batch"), expected / (batch_std + 1e-4))


def test_response_steps_end_at_the_token_that_completes_each_equation(tok):
    ids = tok.encode("7 + 8 = 15, 4 + 3 + 1 = 9, so 95.") + [tok.end_id]
    steps = response_steps(tok, ids, "7 + 8 = 15, 4 + 3 + 1 = 9, so 95.")
    assert [holds for _, holds in steps] == [1.0, 0.0]
    assert [tok.decode(ids[:end + 1]) for end, _ in steps] == ["7 + 8 = 15", "7 + 8 = 15, 4 + 3 + 1 = 9"]
    text = "The reverse of 'apple' is 'elppa'."
    assert response_steps(tok, tok.encode(text), text) == []


def test_step_reward_adds_the_process_advantage_to_each_step_s_tokens(tok):
    """Two answers to one prompt, equal outcome: the one with the false equation is pushed down on the
    tokens up to that equation, the other up; after the last equation only the outcome counts."""
    model = tiny_model(tok, 0)
    records = [{"prompt": "What is 7 + 8?", "answer": "15", "task": "arithmetic"}]
    right, wrong = "7 + 8 = 15, so 15.", "7 + 8 = 16, so 15."

    def reward_fn(recs, responses, ids):
        return Rewards(reward=torch.tensor([1.0, 0.0]))

    cfg = GRPOConfig.from_dict(section(rollout_batch_size=1, samples_per_prompt=2, max_new_tokens=12, step_reward=0.5,
                                       scale_rewards="none"), "grpo")
    ro, stats = make_rollout(model, tok, records, cfg, reward_fn, generator=torch.Generator().manual_seed(0))
    # Replace the sampled answers by known ones and recompute the token advantages from them.
    from lmforge.train.grpo import token_advantages
    from lmforge.train.rollout import Rollout
    response_ids = [tok.encode(t) + [tok.end_id] for t in (right, wrong)]
    prompt = tok.prompt_ids(records[0]["prompt"])
    known = Rollout(records=records * 2, prompt_ids=[prompt] * 2, response_ids=response_ids,
                    responses=[right, wrong], finished=torch.ones(2, dtype=torch.bool),
                    batch=completion_batch([prompt] * 2, response_ids, tok.pad_id))
    steps = [response_steps(tok, ids, text) for ids, text in zip(response_ids, (right, wrong))]
    adv = token_advantages(torch.tensor([0.5, -0.5]), steps, known, cfg)
    assert adv.shape == known.batch.response_mask.shape
    end = response_steps(tok, response_ids[0], right)[0][0]
    start = len(prompt) - 1
    # step rewards 1 and 0, mean 0.5: +-0.5, times step_reward 0.5
    torch.testing.assert_close(adv[0, start:start + end + 1], torch.full((end + 1,), 0.5 + 0.25))
    torch.testing.assert_close(adv[1, start:start + end + 1], torch.full((end + 1,), -0.5 - 0.25))
    torch.testing.assert_close(adv[0, start + end + 1:start + len(response_ids[0])],
                               torch.full((len(response_ids[0]) - end - 1,), 0.5))
    assert ro.extra["advantages"].dim() == 2  # step_reward > 0: per-token advantages reach the loss
    assert "rollout/step_accuracy" in stats


def test_per_token_advantages_reach_the_clipped_surrogate():
    logp = torch.zeros(1, 3)
    loss, _, _ = clipped_surrogate(logp, logp, torch.tensor([[1.0, -2.0, 0.5]]), epsilon=0.2, epsilon_high=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, 2.0, -0.5]]))


# --------------------------------------------------------------------------- loss pieces


def test_loss_aggregations_against_hand_computation():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])  # 99: masked out
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "grpo", max_new_tokens=4).item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(per_token, mask, "dr_grpo", max_new_tokens=4).item() == pytest.approx(10.0 / (2 * 4))
    assert aggregate(per_token, mask, "dapo", max_new_tokens=4).item() == pytest.approx(10.0 / 4)


def test_clipping_with_epsilon_and_epsilon_high_at_the_boundary():
    ratios = torch.tensor([[1.2, 1.28, 1.3, 0.8, 0.7, 0.7]])
    adv = torch.tensor([1.0])
    logp = torch.log(ratios).requires_grad_(True)
    old = torch.zeros_like(ratios)
    loss, low, high = clipped_surrogate(logp, old, adv, epsilon=0.2, epsilon_high=0.28)
    # A > 0: the ratio is capped at 1 + epsilon_high (1.28), not 1 + epsilon; below 1 nothing is clipped.
    torch.testing.assert_close(loss, -torch.tensor([[1.2, 1.28, 1.28, 0.8, 0.7, 0.7]]))
    assert high.tolist() == [[False, False, True, False, False, False]] and not low.any()
    loss.sum().backward()
    assert logp.grad[0, 2] == 0 and (logp.grad[0, [0, 1, 3, 4, 5]] != 0).all()
    # A < 0: the ratio is floored at 1 - epsilon (0.8); exactly 0.8 is inside the range.
    loss, low, high = clipped_surrogate(torch.log(ratios), old, -adv, epsilon=0.2, epsilon_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[1.2, 1.28, 1.3, 0.8, 0.8, 0.8]]))
    assert low.tolist() == [[False, False, False, False, True, True]] and not high.any()


def test_clip_range_high_defaults_to_clip_range():
    assert GRPOConfig.from_dict(section(clip_range=0.1), "grpo").clip_range_high == 0.1
    assert GRPOConfig.from_dict(section(clip_range=0.1, clip_range_high=0.3), "grpo").clip_range_high == 0.3


def test_k3_against_hand_numbers():
    logp, ref = torch.tensor([-1.0, -2.0, -1.5]), torch.tensor([-2.0, -1.0, -1.5])
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1, 0.0]))


def completions(tok, n_rows=4):
    prompts = [tok.prompt_ids(f"What is {i} + 1?") for i in range(n_rows)]
    responses = [tok.encode(f"{i} + 1 = {i + 1}.")[: 2 + i] + [tok.end_id] for i in range(n_rows)]
    return completion_batch(prompts, responses, tok.pad_id)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_value_and_gradient_at_ratio_one(tok, loss_type):
    """One step per iteration: ratio is 1, so the loss is -A per token plus beta * k3, and its
    gradient is the policy gradient -A * grad log p (aggregated the same way) plus the KL's."""
    model, ref = tiny_model(tok, 0), tiny_model(tok, 1)
    cb = completions(tok)
    cfg = GRPOConfig.from_dict(section(loss_type=loss_type, beta=0.1, rollout_batch_size=2, samples_per_prompt=2),
                               "grpo")
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    with torch.no_grad():
        ref_logps = token_logprobs(ref, cb)
    batch = {"batch": cb, "advantages": adv, "ref_logps": ref_logps, "rewards": torch.tensor([1.0, 0, 1, 0]),
             "correct": torch.tensor([1.0, 0, 1, 0]), "group_std": torch.full((4,), 0.7071),
             "truncated": torch.zeros(4)}
    loss, metrics = grpo_loss(model, batch, cfg)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logp = token_logprobs(model, cb)
    mask = cb.response_mask
    d = ref_logps - logp
    kl = torch.exp(d) - d - 1
    per_token = -adv[:, None] * logp + 0.1 * kl  # value differs from the loss by -A (constant); gradient is equal
    if loss_type == "grpo":
        reference = ((per_token * mask).sum(1) / mask.sum(1)).mean()
        value = ((((-adv[:, None]) + 0.1 * kl) * mask).sum(1) / mask.sum(1)).mean()
    elif loss_type == "dr_grpo":
        reference = (per_token * mask).sum() / (4 * cfg.max_new_tokens)
        value = (((-adv[:, None]) + 0.1 * kl) * mask).sum() / (4 * cfg.max_new_tokens)
    else:
        reference = (per_token * mask).sum() / mask.sum()
        value = (((-adv[:, None]) + 0.1 * kl) * mask).sum() / mask.sum()
    reference.backward()
    assert loss.item() == pytest.approx(value.item(), abs=1e-6)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)
    assert metrics["kl"] == pytest.approx(((kl * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert metrics["clip_ratio"] == 0 and metrics["reward"] == 0.5 and metrics["accuracy"] == 0.5
    assert metrics["completions/mean_length"] == pytest.approx(mask.sum(1).mean().item())


# --------------------------------------------------------------------------- rollouts


def test_rollout_groups_rewards_and_old_logprobs(tok):
    model, ref = tiny_model(tok, 0), tiny_model(tok, 1)
    records = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "task": "arithmetic"} for i in range(3)]

    def reward_fn(recs, responses, ids):  # reward = number of response tokens: groups differ
        return Rewards(reward=torch.tensor([float(len(i)) for i in ids]), correct=torch.zeros(len(ids)))

    cfg = GRPOConfig.from_dict(section(rollout_batch_size=3, batch_size=1, samples_per_prompt=4, max_new_tokens=5),
                               "grpo")
    ro, stats = make_rollout(model, tok, records, cfg, reward_fn, reference=ref,
                             generator=torch.Generator().manual_seed(0))
    assert stats["rollout/prompts"] == 3 and stats["rollout/accuracy"] == 0
    assert [r["prompt"] for r in ro.records] == [r["prompt"] for r in records for _ in range(4)]
    rewards = torch.tensor([float(len(i)) for i in ro.response_ids])
    torch.testing.assert_close(ro.extra["advantages"], group_advantages(rewards, 4, "group"))
    torch.testing.assert_close(ro.extra["group_std"], rewards.view(3, 4).std(1).repeat_interleave(4))
    # Three optimizer steps per iteration: the sampling policy's log-probs are kept; the reference's too.
    with torch.no_grad():
        torch.testing.assert_close(ro.extra["old_logps"], token_logprobs(model, ro.batch))
        torch.testing.assert_close(ro.extra["ref_logps"], token_logprobs(ref, ro.batch))
    one_step = GRPOConfig.from_dict(section(rollout_batch_size=3, samples_per_prompt=4, max_new_tokens=5), "grpo")
    ro, _ = make_rollout(model, tok, records, one_step, reward_fn, generator=torch.Generator().manual_seed(0))
    assert "old_logps" not in ro.extra and "ref_logps" not in ro.extra


def test_informative_groups_come_first_then_fill_in_order():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])  # groups: equal, differ, equal, differ
    assert informative_groups(rewards, 2, 2) == [1, 3]
    assert informative_groups(rewards, 2, 3) == [0, 1, 3]
    assert informative_groups(rewards, 2, 4) == [0, 1, 2, 3]


def test_oversampling_keeps_groups_whose_rewards_differ(tok):
    """Rewards depend on the prompt only for prompts 0 and 3 (one sample right): those groups are kept."""
    model = tiny_model(tok, 0)
    records = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "task": "arithmetic"} for i in range(6)]
    calls = []

    def reward_fn(recs, responses, ids):
        calls.append(len(recs))
        return Rewards(reward=torch.tensor([float(r["prompt"] in ("What is 0 + 1?", "What is 3 + 1?") and j == 0)
                                            for j, r in zip([0, 1] * len(recs), recs)]))

    cfg = GRPOConfig.from_dict(section(rollout_batch_size=2, samples_per_prompt=2, max_new_tokens=3, oversample=3),
                               "grpo")
    ro, stats = make_rollout(model, tok, records, cfg, reward_fn, generator=torch.Generator().manual_seed(0))
    assert calls == [4, 4]  # rounds of rollout_batch_size prompts until two informative groups are found
    assert [r["prompt"] for r in ro.records] == ["What is 0 + 1?"] * 2 + ["What is 3 + 1?"] * 2
    assert ro.extra["rewards"].tolist() == [1.0, 0.0, 1.0, 0.0] and (ro.extra["group_std"] > 0).all()
    assert stats["rollout/prompts"] == 4 and stats["rollout/frac_reward_zero_std"] == 0.5
    assert stats["rollout/reward"] == 0.25 and "rollout/accuracy" not in stats


# --------------------------------------------------------------------------- config errors


def test_group_of_one_is_an_error_naming_both_keys():
    with pytest.raises(LmforgeError, match=r"'grpo.samples_per_prompt' is 1 \(with 'grpo.scale_rewards': group\)"):
        GRPOConfig.from_dict(section(samples_per_prompt=1), "grpo")


def test_batch_size_must_divide_rollout_batch_size():
    with pytest.raises(LmforgeError, match=r"'grpo.batch_size' \(3\) must divide 'grpo.rollout_batch_size' \(8\)"):
        GRPOConfig.from_dict(section(rollout_batch_size=8, batch_size=3), "grpo")
    with pytest.raises(LmforgeError, match=r"'grpo.grad_accum_steps'"):
        GRPOConfig.from_dict(section(grad_accum_steps=2), "grpo")
    cfg = GRPOConfig.from_dict(section(rollout_batch_size=8, batch_size=2, ppo_epochs=3), "grpo")
    assert (cfg.n_minibatches, cfg.steps_per_iteration) == (4, 12)


# --------------------------------------------------------------------------- the stage


@pytest.fixture
def policy(tmp_path, tok):
    model = tiny_model(tok)
    path = tmp_path / "sft.pt"
    save_model(path, model, kind="causal_lm", model_config=model.cfg.to_dict(), tokenizer=tok, meta={})
    return path


def stage_run(tmp_path, policy, inputs=None, **grpo):
    params = {"grpo": section(**{"rollout_batch_size": 2, "samples_per_prompt": 2, "max_new_tokens": 6, "max_steps": 2,
                                 "eval_every": 2, "checkpoint_every": 2, "log_every": 1, **grpo}),
              "data": {"builtin": BUILTIN}, "seed": 7}
    outputs = {"model": str(tmp_path / "grpo" / "model.pt"), "metrics": str(tmp_path / "grpo" / "metrics.json")}
    env = StageEnv(stage="grpo", seed=7, device="cpu", threads=1, tracking_enabled=False,
                   ckpt_root=str(tmp_path / "ck"))
    return grpo_stage.run(params, {"policy": str(policy), **(inputs or {})}, outputs, env), outputs


@pytest.fixture
def reference_loads(monkeypatch):
    loads = []
    real = grpo_stage.load_reference

    def counting(*args, **kw):
        loads.append(args[0])
        return real(*args, **kw)

    monkeypatch.setattr(grpo_stage, "load_reference", counting)
    return loads


@pytest.mark.integration
def test_stage_writes_model_and_metrics(tmp_path, policy, reference_loads):
    metrics, outputs = stage_run(tmp_path, policy, batch_size=1)
    on_disk = json.loads(open(outputs["metrics"]).read())
    assert on_disk["steps"] == 2 and on_disk["reference"] == str(policy) and reference_loads == [str(policy)]
    for which in ("sft", "grpo"):
        assert 0 <= on_disk["heldout"][which]["accuracy"] <= 1
        assert 0 <= on_disk["heldout"][which]["dismissive_rate"] <= 1
    assert on_disk["heldout"]["n"] + on_disk["heldout"]["n_skipped"] == BUILTIN["n_val"]
    assert on_disk["val_loss"] == -on_disk["val_accuracy"] and len(on_disk["samples"]) >= 1
    model, _, ckpt = load_model(outputs["model"])
    assert ckpt["meta"]["stage"] == "grpo"
    # An untrained model answers nothing right: every group's rewards are equal (advantage 0), the
    # reference is the policy itself (KL 0), so the loss has no gradient and the weights stay put.
    start, _, _ = load_model(policy)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))


@pytest.mark.integration
def test_checkpoints_are_picked_on_rl_dev_and_rl_val_is_only_reported(tmp_path, policy, monkeypatch):
    asked = []
    real = grpo_stage.greedy_responses

    def recording(model, tok, prompts, *a, **kw):
        asked.append(list(prompts))
        return real(model, tok, prompts, *a, **kw)

    monkeypatch.setattr(grpo_stage, "greedy_responses", recording)  # selection on rl_dev
    monkeypatch.setattr(evaluate, "greedy_responses", recording)  # held-out numbers and logged samples on rl_val
    stage_run(tmp_path, policy)
    splits = make_task_data(BUILTIN, 7)
    dev, val = ({r["prompt"] for r in splits[s]} for s in ("rl_dev", "rl_val"))
    assert dev and not dev & val
    selection = [a for a in asked if set(a) <= dev]
    reported = [a for a in asked if set(a) <= val]
    # two evaluations (step 2, final) on rl_dev; before/after accuracy and the samples on rl_val
    assert len(selection) == 2 and len(reported) == len(asked) - 2 >= 2


class LengthReward:
    """Stands in for RewardFunction: longer answers score more, so groups have spread and the policy moves."""

    def __init__(self, spec, **kw):
        pass

    def __call__(self, records, responses, response_ids=None):
        return Rewards(reward=torch.tensor([float(len(r)) for r in responses]))


@pytest.mark.integration
def test_beta_zero_loads_no_reference_and_trains(tmp_path, policy, reference_loads, monkeypatch):
    monkeypatch.setattr(grpo_stage, "RewardFunction", LengthReward)
    metrics, outputs = stage_run(tmp_path, policy, beta=0.0, temperature=2.0, max_steps=1, eval_every=1)
    assert reference_loads == [] and metrics["reference"] is None
    model, _, _ = load_model(outputs["model"])
    start, _, _ = load_model(policy)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))


def test_verifiable_reward_on_prompts_without_answers_fails_before_training(tmp_path, policy):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Say hello."}\n{"prompt": "What is 1 + 1?", "answer": "2"}\n')
    with pytest.raises(LmforgeError, match=r"'grpo.reward_fn.verifiable' is 1.0, but 1 of 2 prompts .*"
                                           r"prompts.jsonl line 1"):
        stage_run(tmp_path, policy, inputs={"data": str(data)}, data=str(data))
    assert not (tmp_path / "grpo" / "model.pt").exists()


def test_reference_with_a_wider_vocabulary_is_refused(tmp_path, tok, policy):
    cfg = ModelConfig(**{**tiny_model(tok).cfg.to_dict(), "vocab_size": tok.vocab_size + 8})
    wide = tmp_path / "wide.pt"
    save_model(wide, Transformer(cfg), kind="causal_lm", model_config=cfg.to_dict(), tokenizer=tok, meta={})
    with pytest.raises(LmforgeError, match=rf"^config key 'grpo.reference': {wide} has tokenizer .* and vocab_size "
                                           rf"{tok.vocab_size + 8}, but the policy .* vocab_size {tok.vocab_size}"):
        stage_run(tmp_path, policy, {"reference": str(wide)})
