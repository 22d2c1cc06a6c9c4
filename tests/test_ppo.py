"""PPO: GAE, clipped losses, KL estimators and controller against hand formulas; the stage's errors; a tiny run."""
import json
import math

import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.config import apply_schema
from lmforge.data.builtin import make_task_data
from lmforge.errors import LmforgeError
from lmforge.loader import load_model
from lmforge.model import ModelConfig, RewardModel, Transformer
from lmforge.stages import ppo as stage
from lmforge.tokenizer import LMTokenizer
from lmforge.train.policy import token_logprobs
from lmforge.train.ppo import (KLController, PolicyAndValue, PPOSettings, adaptive_kl_coef, clipped_policy_loss,
                               clipped_value_loss, gae, kl_estimate, ppo_loss, prepare_rollout, sequence_scores,
                               token_rewards, train_config, whiten)
from lmforge.train.rollout import sample_rollout
from lmforge.workflow import StageEnv

BUILTIN = {"n_sft": 8, "n_pref": 8, "n_rl": 16, "n_val": 8,
           "tasks": {"arithmetic": 1.0, "string": 0.0, "docstring": 0.0}}


# --------------------------------------------------------------------------- GAE


def spans(lengths_and_offsets, T):
    """A (B, T) mask with one contiguous span per row: (offset, length)."""
    mask = torch.zeros(len(lengths_and_offsets), T)
    for i, (off, n) in enumerate(lengths_and_offsets):
        mask[i, off:off + n] = 1.0
    return mask


def reference_gae(rewards, values, mask, gamma, lam):
    """Per row: the response's rewards and values as plain lists, the textbook backwards recursion."""
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        pos = [t for t in range(rewards.shape[1]) if mask[i, t] > 0]
        r = [rewards[i, t].item() for t in pos]
        v = [values[i, t].item() for t in pos]
        a, last = [0.0] * len(pos), 0.0
        for k in reversed(range(len(pos))):
            next_v = v[k + 1] if k + 1 < len(pos) else 0.0
            delta = r[k] + gamma * next_v - v[k]
            last = delta + gamma * lam * last
            a[k] = last
        for k, t in enumerate(pos):
            adv[i, t], ret[i, t] = a[k], a[k] + v[k]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0), (0.5, 0.7)])
def test_gae_matches_backwards_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    T = 12
    mask = spans([(2, 7), (0, 12), (5, 1), (3, 4), (9, 3)], T)
    rewards, values = torch.randn(5, T, generator=g), torch.randn(5, T, generator=g)
    adv, ret = gae(rewards * mask, values * mask, mask, gamma, lam)
    want_adv, want_ret = reference_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, want_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, want_ret, atol=1e-5, rtol=1e-5)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    mask = spans([(1, 4)], 6)
    rewards = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 0.0]])
    values = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.5, 0.0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert adv[0, 1:5].tolist() == pytest.approx([10 - 0.5, 9 - 0.5, 7 - 0.5, 4 - 0.5])
    assert ret[0, 1:5].tolist() == pytest.approx([10, 9, 7, 4])


def test_token_rewards_kl_everywhere_score_at_last_token_and_whitening():
    mask = spans([(1, 3), (0, 2)], 5)
    kl = torch.full((2, 5), 0.5)
    r = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    assert r[0].tolist() == pytest.approx([0, -0.05, -0.05, 1.95, 0])
    assert r[1].tolist() == pytest.approx([-0.05, -1.05, 0, 0, 0])
    w = whiten(r, mask)
    vals = w[mask > 0]
    assert vals.mean().item() == pytest.approx(0, abs=1e-6)
    assert vals.var(unbiased=True).item() == pytest.approx(1, abs=1e-4)  # n - 1, as TRL's masked_var
    kept = whiten(r, mask, shift_mean=False)[mask > 0]
    assert kept.mean().item() == pytest.approx(r[mask > 0].mean().item(), abs=1e-6)


def test_missing_eos_penalty_only_on_unfinished_rows():
    scores = sequence_scores(torch.tensor([2.0, 2.0, -1.0]), torch.tensor([True, False, False]), 1.5)
    assert scores.tolist() == [2.0, 0.5, -2.5]


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
def test_policy_clipping_at_the_boundary(adv_sign):
    eps = 0.2
    ratios = torch.tensor([[1 + eps - 1e-3, 1 + eps + 1e-3, 1 - eps + 1e-3, 1 - eps - 1e-3, 1.0]])
    old = torch.full_like(ratios, -2.0)
    logp = (old + ratios.log()).requires_grad_(True)
    adv = torch.full_like(ratios, adv_sign * 1.5)
    mask = torch.ones_like(ratios)
    loss, stats = clipped_policy_loss(logp, old, adv, mask, eps)
    loss.backward()
    grad = logp.grad[0]
    # A > 0 clips above 1 + eps, A < 0 clips below 1 - eps: there the gradient is exactly zero.
    clipped_col = 1 if adv_sign > 0 else 3
    for j in range(5):
        if j == clipped_col:
            assert grad[j].item() == 0.0
        else:  # d/dlogp of -A * ratio / n = -A * ratio / n
            assert grad[j].item() == pytest.approx(-adv[0, j].item() * ratios[0, j].item() / 5, rel=1e-5)
    assert stats["policy/clipfrac"] == pytest.approx(1 / 5)
    want = sum(max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)) for a, r in zip(adv[0].tolist(), ratios[0].tolist()))
    assert loss.item() == pytest.approx(want / 5, rel=1e-5)
    assert stats["policy/approxkl_token"] == pytest.approx(0.5 * (ratios.log() ** 2).mean().item(), rel=1e-5)


def test_policy_loss_ignores_masked_tokens():
    logp = torch.tensor([[0.0, -1.0, 5.0]])
    old = torch.tensor([[0.0, -1.0, -5.0]])
    adv = torch.tensor([[1.0, 2.0, 100.0]])
    loss, stats = clipped_policy_loss(logp, old, adv, torch.tensor([[1.0, 1.0, 0.0]]), 0.2)
    assert loss.item() == pytest.approx(-1.5) and stats["policy/clipfrac"] == 0


def test_value_clipping():
    old = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, -0.5, 0.1, 1.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    loss, stats = clipped_value_loss(values, old, returns, mask, 0.2)
    # col 0: moved past the clip toward R: clipped (0.2 - 1)^2 = 0.64 > 0.25 wins, no gradient;
    # col 1: moved away from R: unclipped 2.25 > (−0.2 − 1)^2 = 1.44; col 2: inside the clip; col 3: unchanged.
    per_token = [0.64, 2.25, 0.81, 4.0]
    assert loss.item() == pytest.approx(0.5 * sum(per_token) / 4, rel=1e-5)
    assert stats["val/clipfrac"] == pytest.approx(1 / 4)
    loss.backward()
    assert values.grad[0, 0].item() == 0.0
    assert values.grad[0, 1].item() == pytest.approx(0.5 * 2 * (-0.5 - 1.0) / 4)


def test_kl_estimators_against_hand_values():
    logp = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.4), math.log(0.3)])
    k1 = kl_estimate(logp, ref, "k1")
    k3 = kl_estimate(logp, ref, "k3")
    assert k1.tolist() == pytest.approx([math.log(2), math.log(0.5), 0.0], abs=1e-6)
    # k3 = q/p - 1 - log(q/p)
    assert k3.tolist() == pytest.approx([0.5 - 1 - math.log(0.5), 2 - 1 - math.log(2), 0.0], abs=1e-6)
    assert (k3 >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logp, ref, "k2")


def test_adaptive_kl_controller_update_and_resume():
    # Formula: coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon).
    assert adaptive_kl_coef(0.1, 6.0, 4.0, 100, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, 4.4, 4.0, 100, 10) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert adaptive_kl_coef(0.1, 0.0, 4.0, 100, 10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))

    ctl = KLController(0.1, target=4.0, horizon=100, n=10)
    assert ctl.coef_for(0) == pytest.approx(0.1)
    ctl.observe(0, 6.0)
    saved = {k: v.clone() for k, v in ctl.state_dict().items()}
    c1 = ctl.coef_for(1)
    assert c1 == pytest.approx(0.1 * 1.02)
    assert ctl.coef_for(1) == pytest.approx(c1)  # asked again for the same iteration: no second update
    # A run resumed inside iteration 0 samples it again with iteration 0's coefficient, then moves on once.
    resumed = KLController(0.1, target=4.0, horizon=100, n=10)
    resumed.load_state_dict(saved)
    assert resumed.coef_for(0) == pytest.approx(0.1)
    resumed.observe(0, 6.0)
    assert resumed.coef_for(1) == pytest.approx(c1)
    # Fixed controller: never moves.
    fixed = KLController(0.05)
    fixed.observe(0, 100.0)
    assert fixed.coef_for(1) == 0.05


def test_batch_size_must_divide_rollout_batch_size():
    section = apply_schema({"ppo": {"rollout_batch_size": 32, "batch_size": 3}})["ppo"]
    with pytest.raises(LmforgeError,
                       match=r"config key 'ppo.batch_size' \(3\) must divide 'ppo.rollout_batch_size' \(32\)"):
        train_config(section)
    cfg, n = train_config(apply_schema({"ppo": {"rollout_batch_size": 32, "batch_size": 8}})["ppo"])
    assert (cfg.batch_size, cfg.grad_accum_steps, n) == (8, 1, 4)
    with pytest.raises(LmforgeError, match="ppo.grad_accum_steps"):
        train_config(apply_schema({"ppo": {"grad_accum_steps": 2}})["ppo"])


# --------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tok():
    texts = [f"What is {a} + {b}? {a} + {b} = {a + b}." for a in range(20) for b in range(0, 20, 3)]
    return LMTokenizer.train(texts, vocab_size=320)


def tiny_transformer(tok, seed):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                   max_seq_len=48))


def save(path, model, tok, kind):
    save_model(path, model, kind=kind, model_config=(model.trunk if kind == "reward_model" else model).cfg.to_dict(),
               tokenizer=tok, meta={"stage": "test"})
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_ckpts")
    policy = save(root / "sft.pt", tiny_transformer(tok, 0), tok, "causal_lm")
    rm = save(root / "rm.pt", RewardModel(tiny_transformer(tok, 1)), tok, "reward_model")
    other_tok = LMTokenizer.train([f"other words {i} here" for i in range(50)], vocab_size=300)
    other = save(root / "other.pt", tiny_transformer(other_tok, 2), other_tok, "causal_lm")
    return {"policy": policy, "reward_model": rm, "other": other}


@pytest.mark.parametrize("value_model,score_position", [("separate", "last_token"), ("shared", "last_token"),
                                                         ("separate", "after_eos")])
def test_prepare_rollout_then_loss_starts_at_ratio_one(tok, value_model, score_position):
    torch.manual_seed(0)
    policy = tiny_transformer(tok, 0)
    reference = tiny_transformer(tok, 0).eval()
    model = PolicyAndValue(policy, value_model=value_model)
    records = [{"prompt": f"What is {i} + 3?"} for i in range(4)]
    ro = sample_rollout(policy, tok, records, n_per_prompt=1, max_new_tokens=6, temperature=1.0)
    ro.finished = torch.tensor([True, False, True, True])  # rows 0, 2, 3 as if they had ended with <|end|>
    s = PPOSettings(kl_coef=0.1, score_position=score_position)
    scores = torch.tensor([1.0, 0.0, -1.0, 2.0])
    response_tokens = ro.batch.response_mask.sum()
    stats = prepare_rollout(model, reference, ro, scores, kl_coef=0.1, s=s)
    value_mask = ro.extra["value_mask"]
    if score_position == "after_eos":  # one more valued step per finished row, whose return is its score
        assert value_mask.sum() == response_tokens + 3
        after = (value_mask - ro.batch.response_mask).bool()
        assert ro.extra["returns"][after].tolist() == pytest.approx([1.0, -1.0, 2.0])
    else:
        torch.testing.assert_close(value_mask, ro.batch.response_mask)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    mask = ro.batch.response_mask
    assert ro.extra["advantages"][mask > 0].mean().item() == pytest.approx(0, abs=1e-5)
    torch.testing.assert_close(ro.extra["old_logp"], token_logprobs(policy, ro.batch))
    loss, metrics = ppo_loss(model, ro.select([0, 1, 2, 3]), s=s)
    assert metrics["policy/approxkl"] == pytest.approx(0, abs=1e-10) and metrics["policy/clipfrac"] == 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- the stage


def stage_params(**ppo):
    section = {"rollout_batch_size": 4, "batch_size": 2, "ppo_epochs": 1, "max_steps": 4, "max_new_tokens": 8,
               "eval_every": 2, "checkpoint_every": 2, "log_every": 1, "lr": 1e-4, **ppo}
    cfg = apply_schema({"ppo": section, "data": {"builtin": BUILTIN}, "seed": 3})
    return {"ppo": cfg["ppo"], "data": {"builtin": cfg["data"]["builtin"]}, "seed": 3}


def run_stage(tmp_path, params, inputs):
    env = StageEnv(stage="ppo", device="cpu", threads=1, tracking_enabled=False, ckpt_root=str(tmp_path / "ck"))
    outputs = {"model": str(tmp_path / "ppo" / "model.pt"), "metrics": str(tmp_path / "ppo" / "metrics.json")}
    return stage.run(params, inputs, outputs, env), outputs


def test_verifiable_reward_needs_answers(tmp_path, ckpts):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say {w}."}) for w in ("yes", "no")) + "\n")
    params = stage_params(data=str(data), reward_fn={"rm": 0.0, "verifiable": 1.0})
    with pytest.raises(LmforgeError, match=r"'ppo.reward_fn.verifiable' is 1.0, but 2 of 2 prompts in "
                                           r"'ppo.data' \(.*prompts.jsonl\) have no reference answer"):
        run_stage(tmp_path, params, {"policy": ckpts["policy"], "data": str(data)})
    assert not (tmp_path / "ppo" / "model.pt").exists()


def test_reward_model_as_policy_is_refused(tmp_path, ckpts):
    with pytest.raises(LmforgeError, match="is a reward_model checkpoint, but a causal language model is needed"):
        run_stage(tmp_path, stage_params(), {"policy": ckpts["reward_model"], "reward_model": ckpts["reward_model"]})


def test_reference_with_another_tokenizer_is_refused(tmp_path, ckpts):
    params = stage_params(reference=ckpts["other"])
    with pytest.raises(LmforgeError, match=r"^config key 'ppo.reference': .*other.pt has tokenizer .*the reference must "
                                           r"share the policy's tokenizer and vocabulary"):
        run_stage(tmp_path, params, {"policy": ckpts["policy"], "reward_model": ckpts["reward_model"],
                                     "reference": ckpts["other"]})


@pytest.mark.parametrize("value_model,kl_target", [("separate", None), ("shared", 0.5)])
@pytest.mark.integration
def test_tiny_stage_run_writes_policy_and_metrics(tmp_path, ckpts, value_model, kl_target, capsys):
    params = stage_params(value_model=value_model, kl_target=kl_target, kl_coef=0.05,
                          reward_fn={"rm": 1.0, "verifiable": 0.5})
    metrics, outputs = run_stage(tmp_path, params, {"policy": ckpts["policy"], "reward_model": ckpts["reward_model"]})
    model, _, ckpt = load_model(outputs["model"])
    assert ckpt["kind"] == "causal_lm" and ckpt["meta"]["stage"] == "ppo" and ckpt["meta"]["step"] == 4
    sft, _, _ = load_model(ckpts["policy"])
    assert model.state_dict().keys() == sft.state_dict().keys()  # the policy alone, no value head
    on_disk = json.loads(open(outputs["metrics"]).read())
    assert on_disk["steps"] == 4 and len(on_disk["iterations"]) == 2  # 4 steps / (1 epoch * 2 mini-batches)
    for which in ("sft", "ppo"):
        h = on_disk["heldout"][which]
        assert {"reward", "score", "accuracy", "missing_eos_rate", "rm_score"} <= set(h)
        assert 0 <= h["accuracy"] <= 1 and 0 <= h["missing_eos_rate"] <= 1
    assert on_disk["heldout"]["n"] == BUILTIN["n_val"] and math.isfinite(on_disk["heldout"]["kl"])
    sampled = on_disk["heldout"]["sampled"]
    assert sampled["sft"]["kl"] == pytest.approx(0, abs=1e-5)  # the SFT model is the reference
    assert sampled["ppo"]["kl"] == on_disk["heldout"]["kl"] and {"reward", "score"} <= set(sampled["ppo"])
    assert len(on_disk["samples"]) == 5 and {"prompt", "sft", "ppo"} == set(on_disk["samples"][0])
    # Every optimizer step logs the loss statistics and its iteration's rollout statistics (TRL names).
    step_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[ppo] step ")]
    assert len(step_lines) == 4
    logged = {kv.split("=")[0] for kv in step_lines[-1].split(": ", 1)[1].split()}
    assert {"loss", "objective/kl", "objective/entropy", "objective/scores", "env/reward_mean", "policy/clipfrac",
            "policy/approxkl", "val/vf_explained_var", "val/clipfrac", "env/response_length", "kl_coef",
            "env/missing_eos_rate", "env/accuracy", "loss/policy", "loss/value"} <= logged
    assert {"val_loss", "val_reward", "val_accuracy"} <= set(on_disk["history"][0])
    assert on_disk["history"][0]["val_loss"] == pytest.approx(-on_disk["history"][0]["val_sampled_score"])
    assert {"val_sampled_reward", "val_sampled_kl"} <= set(on_disk["history"][0])
    it0, it1 = on_disk["iterations"]
    assert it0["objective/kl"] == pytest.approx(0, abs=1e-5) and it0["kl_coef"] == pytest.approx(0.05)
    if kl_target is not None:  # KL below target: the coefficient shrinks by the controller's formula
        want = adaptive_kl_coef(0.05, it0["objective/kl"], kl_target, 10000, 4)
        assert it1["kl_coef"] == pytest.approx(want, rel=1e-6)
        assert it1["kl_coef"] < it0["kl_coef"]
    else:
        assert it1["kl_coef"] == 0.05


@pytest.mark.integration
def test_checkpoints_are_picked_on_rl_dev_and_rl_val_is_only_reported(tmp_path, ckpts, monkeypatch):
    asked = []
    real = stage.heldout_metrics

    def recording(policy, tok, records, *a, **kw):
        asked.append({r["prompt"] for r in records})
        return real(policy, tok, records, *a, **kw)

    monkeypatch.setattr(stage, "heldout_metrics", recording)
    params = stage_params()
    run_stage(tmp_path, params, {"policy": ckpts["policy"], "reward_model": ckpts["reward_model"]})
    splits = make_task_data(params["data"]["builtin"], params["seed"])
    dev, val = ({r["prompt"] for r in splits[s]} for s in ("rl_dev", "rl_val"))
    assert dev and not dev & val
    # evaluations at steps 2 and 4 on rl_dev; before/after and the logged samples on rl_val
    assert sum(a <= dev for a in asked) == 2 and all(a <= val for a in asked if not a <= dev)


@pytest.mark.integration
def test_resumed_run_matches_uninterrupted_run(tmp_path, ckpts, monkeypatch):
    """Killed after an iteration boundary and rerun with the same config: same weights, same adaptive KL coefficient."""
    from lmforge.train import loop

    inputs = {"policy": ckpts["policy"], "reward_model": ckpts["reward_model"]}
    full, full_out = run_stage(tmp_path / "full", stage_params(kl_target=0.5, max_steps=6), inputs)

    class Killed(Exception):
        pass

    log_step = loop.Log.step

    def killed_at_step_3(self, step, metrics, every):  # after the checkpoint of step 2 (checkpoint_every 2)
        if step == 3:
            raise Killed
        log_step(self, step, metrics, every)

    with monkeypatch.context() as m:
        m.setattr(loop.Log, "step", killed_at_step_3)
        with pytest.raises(Killed):
            run_stage(tmp_path / "split", stage_params(kl_target=0.5, max_steps=6), inputs)
    resumed, resumed_out = run_stage(tmp_path / "split", stage_params(kl_target=0.5, max_steps=6), inputs)
    assert resumed["resumed_from"] == 2 and [it["iteration"] for it in resumed["iterations"]] == [1, 2]
    assert resumed["iterations"][-1]["kl_coef"] == pytest.approx(full["iterations"][-1]["kl_coef"], rel=1e-6)
    a, _, _ = load_model(full_out["model"])
    b, _, _ = load_model(resumed_out["model"])
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=name)
