"""The alignment losses against TRL's own code (trl==1.16.0, pinned in requirements.lock), on the same tensors.

TRL's losses live in trainer methods. Each is called unbound with a stub ``self`` that
holds only the attributes the method reads, and a stub model that hands back the
log-probs (or rewards) this test controls, so nothing is downloaded and both sides see
identical inputs. Values and gradients must agree to 1e-6. PPO has no callable loss in
TRL 1.x: it is checked against formulas written here from the papers.
"""
from __future__ import annotations

import inspect
import os
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import
trl = pytest.importorskip("trl")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.reward_trainer import RewardTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

from lmforge.config import apply_schema  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.sections import DPOConfig, GRPOConfig  # noqa: E402
from lmforge.train.dpo import chosen_nll, preference_loss  # noqa: E402
from lmforge.train.grpo import group_advantages, grpo_loss  # noqa: E402
from lmforge.train.policy import completion_batch, token_logprobs  # noqa: E402
from lmforge.train.ppo import gae, last_token_mask, token_rewards, whiten  # noqa: E402
from lmforge.train.reward import bradley_terry_loss  # noqa: E402

TOL = dict(atol=1e-6, rtol=0)
torch.set_default_dtype(torch.float32)


def accelerator():
    """What TRL's loss methods ask of an Accelerator on one CPU process."""
    same = lambda x, **_: x  # noqa: E731
    return SimpleNamespace(device=torch.device("cpu"), num_processes=1, gather=same, gather_for_metrics=same,
                           reduce=same, sync_gradients=True)


def stub(**attrs):
    """A stand-in ``self``: the trainer's attributes a method reads, training mode, metric sinks."""
    base = dict(model=SimpleNamespace(training=True), accelerator=accelerator(), aux_loss_enabled=False,
                _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    return SimpleNamespace(**{**base, **attrs})


def assert_same(a, b, leaves):
    """Equal values, and equal gradients with respect to every leaf."""
    torch.testing.assert_close(a, b, **TOL)
    for ga, gb in zip(torch.autograd.grad(a, leaves, retain_graph=True), torch.autograd.grad(b, leaves, retain_graph=True)):
        torch.testing.assert_close(ga, gb, **TOL)


# --------------------------------------------------------------------------- DPO


def pairs_with_unequal_lengths(seed=0, B=5, T=9):
    """Per-token log-probs (2B, T) of chosen rows then rejected rows, their completion masks (prompt of 2
    tokens, responses of different lengths), and the reference's summed log-probs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, 3, 7, 4, 2, 6, 2, 5, 7, 1])[:2 * B]
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    mask = torch.cat([torch.zeros(2 * B, 2), mask], 1)  # the prompt's two tokens first
    leaf = (-torch.rand(2 * B, T + 2, generator=g) * 2).requires_grad_(True)
    ref = -torch.rand(2 * B, generator=g) * 2 * lengths
    # Zero off the completion, as lmforge's token_logprobs and TRL's model (labels -100 there) both give.
    return leaf * mask, mask, ref, leaf


def trl_dpo_loss(per_token, mask, ref, *, beta, loss_types, loss_weights=None, label_smoothing=0.0):
    """TRL's ``DPOTrainer._compute_loss`` on log-probs the stub model returns (shifted as TRL's model does)."""
    n = len(per_token)
    completion_mask = torch.cat([torch.zeros(n, 1), mask], 1)  # on input positions: one more in front
    inputs = {"input_ids": torch.zeros_like(completion_mask, dtype=torch.long),
              "attention_mask": torch.ones_like(completion_mask, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:n // 2], "ref_rejected_logps": ref[n // 2:]}
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    self = stub(beta=beta, loss_types=loss_types, loss_weights=loss_weights or [1.0] * len(loss_types),
                label_smoothing=label_smoothing, ld_alpha=None, precompute_ref_logps=True,
                f_divergence_type="reverse_kl", use_weighting=False)
    return DPOTrainer._compute_loss(self, lambda **_: outputs, inputs, return_outputs=False)


def ours(per_token, mask, ref, **kw):
    logp_c, logp_r = per_token.sum(-1).chunk(2)
    len_c, len_r = mask.sum(-1).chunk(2)
    ref_c, ref_r = ref.chunk(2)
    return preference_loss(logp_c - ref_c, logp_r - ref_r, chosen_len=len_c, rejected_len=len_r, **kw).mean()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_losses_match_trl(loss_type, beta):
    per_token, mask, ref, leaf = pairs_with_unequal_lengths()
    assert_same(ours(per_token, mask, ref, beta=beta, loss_type=loss_type),
                trl_dpo_loss(per_token, mask, ref, beta=beta, loss_types=[loss_type]), [leaf])


def test_rpo_is_trl_sigmoid_plus_weighted_sft_at_unequal_lengths():
    per_token, mask, ref, leaf = pairs_with_unequal_lengths(seed=1)
    logp_c, _ = per_token.sum(-1).chunk(2)
    len_c, _ = mask.sum(-1).chunk(2)
    mine = ours(per_token, mask, ref, beta=0.5) + 2.0 * chosen_nll(logp_c, len_c)
    theirs = trl_dpo_loss(per_token, mask, ref, beta=0.5, loss_types=["sigmoid", "sft"], loss_weights=[1.0, 2.0])
    assert_same(mine, theirs, [leaf])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_conservative_dpo_matches_trl_cpo_sigmoid_on_log_ratios(label_smoothing):
    """TRL 1.16's DPO ``sigmoid`` no longer reads label_smoothing; the conservative-DPO form lives on in CPO's
    ``sigmoid`` loss, which is DPO's with log p - log p_ref in place of CPO's log p."""
    per_token, mask, ref, leaf = pairs_with_unequal_lengths(seed=2)
    logp_c, logp_r = per_token.sum(-1).chunk(2)
    ref_c, ref_r = ref.chunk(2)
    self = stub(alpha=0.0, loss_type="sigmoid", beta=0.3, label_smoothing=label_smoothing)
    theirs, _, _ = CPOTrainer.cpo_loss(self, logp_c - ref_c, logp_r - ref_r)
    mine = ours(per_token, mask, ref, beta=0.3, label_smoothing=label_smoothing)
    assert_same(mine, theirs.mean(), [leaf])
    if label_smoothing == 0:  # and then it is TRL's DPO sigmoid itself
        assert_same(mine, trl_dpo_loss(per_token, mask, ref, beta=0.3, loss_types=["sigmoid"]), [leaf])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.6])
def test_simpo_matches_trl_cpo_simpo(ratio, label_smoothing):
    per_token, mask, _, leaf = pairs_with_unequal_lengths(seed=3)
    logp_c, logp_r = per_token.sum(-1).chunk(2)
    len_c, len_r = mask.sum(-1).chunk(2)
    beta = 2.0
    # TRL's CPO with loss_type simpo takes per-token mean log-probs (its average_log_prob).
    self = stub(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=ratio * beta, label_smoothing=label_smoothing)
    theirs, _, _ = CPOTrainer.cpo_loss(self, logp_c / len_c, logp_r / len_r)
    mine = preference_loss(logp_c, logp_r, beta=beta, loss_type="simpo", chosen_len=len_c, rejected_len=len_r,
                           simpo_gamma_beta_ratio=ratio, label_smoothing=label_smoothing).mean()
    assert_same(mine, theirs.mean(), [leaf])


@pytest.mark.parametrize("orpo_lambda", [0.1, 1.0])
def test_orpo_matches_trl_odds_ratio_loss(orpo_lambda):
    per_token, mask, _, leaf = pairs_with_unequal_lengths(seed=4)
    logp_c, logp_r = per_token.sum(-1).chunk(2)
    len_c, len_r = mask.sum(-1).chunk(2)
    self = stub(beta=orpo_lambda)
    theirs, *_ = ORPOTrainer.odds_ratio_loss(self, logp_c / len_c, logp_r / len_r)
    mine = preference_loss(logp_c, logp_r, beta=0.5, loss_type="orpo", chosen_len=len_c, rejected_len=len_r,
                           orpo_lambda=orpo_lambda).mean()
    # TRL's ORPO loss is nll - mean(odds-ratio term): the pair term enters with a minus sign.
    assert_same(mine, -theirs.mean(), [leaf])
    # Its NLL is cross-entropy over the chosen rows' labelled tokens: with the prompt masked out of the
    # labels, that is lmforge's chosen_nll (TRL labels the prompt tokens too; lmforge does not, as the paper).
    chosen_tokens = per_token[:len(logp_c)][mask[:len(logp_c)].bool()]
    assert_same(chosen_nll(logp_c, len_c), -chosen_tokens.mean(), [leaf])


def test_preference_hyper_parameters_are_validated():
    def check(**dpo):
        return DPOConfig.from_dict(apply_schema({"dpo": dpo})["dpo"], "dpo")

    assert check(loss_type="simpo", label_smoothing=0.1).simpo_gamma_beta_ratio == 0.5
    assert check(loss_type="orpo", orpo_lambda=0.2).orpo_lambda == 0.2
    with pytest.raises(LmforgeError, match=r"'dpo.rpo_alpha' \(1.0\): loss_type orpo already adds"):
        check(loss_type="orpo", rpo_alpha=1.0)
    with pytest.raises(LmforgeError, match=r"'dpo.orpo_lambda' \(0.0\) must be > 0"):
        DPOConfig.from_dict({**apply_schema({"dpo": {}})["dpo"], "orpo_lambda": 0.0}, "dpo")
    with pytest.raises(LmforgeError, match=r"'dpo.simpo_gamma_beta_ratio' \(-1.0\) must be >= 0"):
        DPOConfig.from_dict({**apply_schema({"dpo": {}})["dpo"], "simpo_gamma_beta_ratio": -1.0}, "dpo")


# --------------------------------------------------------------------------- reward model


@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_matches_trl(margin, center):
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(12, generator=g).requires_grad_(True)
    margins = torch.rand(6, generator=g) if margin else None
    inputs = {"input_ids": torch.zeros(12, 3, dtype=torch.long), "attention_mask": torch.ones(12, 3)}
    if margin:
        inputs["margin"] = margins
    self = stub(args=SimpleNamespace(center_rewards_coefficient=center))
    theirs = RewardTrainer.compute_loss(self, lambda **_: SimpleNamespace(logits=rewards[:, None]), inputs)
    mine = bradley_terry_loss(rewards[:6], rewards[6:], margins, center_coef=center or 0.0)
    assert_same(mine, theirs, [rewards])


# --------------------------------------------------------------------------- GRPO


def trl_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str) -> torch.Tensor:
    """The advantage lines of TRL's ``GRPOTrainer._generate_and_score_completions``, run as TRL wrote them
    (cut from the installed source: the method itself generates and scores, which this test does not need)."""
    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    start = src.index('        if self.multi_objective_aggregation == "sum_then_normalize":')
    end = src.index("is_std_zero = torch.isclose", start)
    block = textwrap.dedent(src[start:src.index("\n", end)])
    scope = {"self": SimpleNamespace(multi_objective_aggregation="sum_then_normalize", scale_rewards=scale_rewards,
                                     reward_weights=torch.ones(1)),
             "rewards_per_func": rewards[:, None], "unscorable_mask": torch.zeros(len(rewards), dtype=torch.bool),
             "num_generations": group_size, "device": "cpu", "torch": torch, "nanstd": nanstd}
    exec(block, scope)  # noqa: S102 - TRL's own lines, from the pinned package
    return scope["advantages"]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_grpo_advantages_match_trl(scale_rewards):
    g = torch.Generator().manual_seed(6)
    rewards = torch.cat([torch.randint(0, 3, (12,), generator=g).float(), torch.ones(4)])  # a group of equal rewards
    torch.testing.assert_close(group_advantages(rewards, 4, scale_rewards), trl_advantages(rewards, 4, scale_rewards),
                               **TOL)


P = 3  # every prompt the same length, so lmforge's target axis and TRL's completion columns line up


def grpo_batch(seed, n_rows=8, vocab=11):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (P,), generator=g).tolist() for _ in range(n_rows)]
    responses = [torch.randint(1, vocab, (1 + (3 * i) % 5,), generator=g).tolist() for i in range(n_rows)]
    cb = completion_batch(prompts, responses, pad_id=0)
    logits = torch.randn(*cb.input_ids.shape, vocab, generator=g).requires_grad_(True)
    extra = {"advantages": torch.randn(n_rows, generator=g), "rewards": torch.randn(n_rows, generator=g),
             "correct": torch.full((n_rows,), float("nan")), "group_std": torch.ones(n_rows),
             "truncated": torch.zeros(n_rows),
             "ref_logps": (token_logprobs(lambda *_, **__: logits.detach() * 0.9, cb)),
             "old_logps": token_logprobs(lambda *_, **__: logits.detach() * 1.1, cb),
             "rollout_tokens": torch.full((n_rows,), cb.response_mask.sum().item())}
    return cb, logits, extra


def trl_grpo_loss(cb, logits, mb, *, loss_type, beta, eps, eps_high, max_new_tokens, steps, rollout_tokens,
                  several_steps):
    model = lambda *_, **__: logits  # noqa: E731
    mask = mb["batch"].response_mask[:, P - 1:]
    inputs = {"prompt_ids": mb["batch"].input_ids[:, :P], "prompt_mask": torch.ones(len(mask), P),
              "completion_ids": mb["batch"].input_ids[:, P:], "completion_mask": mask,
              "advantages": mb["advantages"], "num_items_in_batch": torch.tensor(rollout_tokens)}
    if beta:
        inputs["ref_per_token_logps"] = mb["ref_logps"][:, P - 1:]
    if several_steps:
        inputs["old_per_token_logps"] = mb["old_logps"][:, P - 1:]

    def logps_and_entropies(_model, *_args, **_kw):
        return token_logprobs(model, mb["batch"])[:, P - 1:], torch.zeros_like(mask), None

    self = stub(_get_per_token_logps_and_entropies=logps_and_entropies, top_entropy_quantile=1.0,
                off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta, loss_type=loss_type,
                epsilon_low=eps, epsilon_high=eps_high, use_vllm=False, _entropy_bonus_enabled=False,
                current_gradient_accumulation_steps=1, max_completion_length=max_new_tokens,
                args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=steps))
    return GRPOTrainer._compute_loss(self, model, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("minibatches", [1, 4])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_losses_match_trl(loss_type, minibatches, beta):
    """One optimizer step per rollout (old log-probs = the current ones, detached) or four mini-batches of a
    rollout, each one step, read against the sampling policy's log-probs (TRL's steps_per_generation = 4)."""
    cb, logits, extra = grpo_batch(seed=7)
    n_rows = len(cb)
    cfg = GRPOConfig.from_dict(apply_schema({"grpo": {
        "loss_type": loss_type, "beta": beta, "clip_range": 0.2, "clip_range_high": 0.28, "samples_per_prompt": 2,
        "rollout_batch_size": n_rows // 2, "batch_size": n_rows // 2 // minibatches, "max_new_tokens": 6}})["grpo"],
        "grpo")
    assert cfg.n_minibatches == minibatches and cfg.dapo_normalizer == "rollout"
    rows = n_rows // minibatches
    for k in range(minibatches):
        sel = slice(k * rows, (k + 1) * rows)
        sub = type(cb)(cb.input_ids[sel], cb.key_padding_mask[sel], cb.response_mask[sel])
        mb = {"batch": sub, **{name: v[sel] for name, v in extra.items()}}
        if minibatches == 1:
            del mb["old_logps"]
        if not beta:
            del mb["ref_logps"]
        sub_logits = logits[sel]
        mine, _ = grpo_loss(lambda *_, **__: sub_logits, mb, cfg)
        theirs = trl_grpo_loss(cb, sub_logits, mb, loss_type=loss_type, beta=beta, eps=0.2, eps_high=0.28,
                               max_new_tokens=6, steps=minibatches, rollout_tokens=extra["rollout_tokens"][0].item(),
                               several_steps=minibatches > 1)
        assert_same(mine, theirs, [logits])


def test_grpo_dapo_minibatch_normalizer_is_the_minibatch_token_mean():
    cb, logits, extra = grpo_batch(seed=8)
    section = {"loss_type": "dapo", "beta": 0.0, "samples_per_prompt": 2, "rollout_batch_size": 4, "batch_size": 1,
               "max_new_tokens": 6}
    own = GRPOConfig.from_dict(apply_schema({"grpo": {**section, "dapo_normalizer": "minibatch"}})["grpo"], "grpo")
    trl_cfg = GRPOConfig.from_dict(apply_schema({"grpo": section})["grpo"], "grpo")
    sub = type(cb)(cb.input_ids[:2], cb.key_padding_mask[:2], cb.response_mask[:2])
    mb = {"batch": sub, **{name: v[:2] for name, v in extra.items()}}
    a, _ = grpo_loss(lambda *_, **__: logits[:2], mb, own)
    b, _ = grpo_loss(lambda *_, **__: logits[:2], mb, trl_cfg)
    # the same token sum, divided by the mini-batch's tokens or by the rollout's tokens / 4 mini-batches
    ratio = (extra["rollout_tokens"][0] / 4) / sub.response_mask.sum()
    torch.testing.assert_close(a, b * ratio, **TOL)


# --------------------------------------------------------------------------- PPO (formulas from the papers)


def test_ppo_whitening_is_unbiased_as_trl_masked_whiten():
    """TRL's ``masked_whiten`` (trl/core.py in 0.11, trainer/utils.py since): (x - mean) * rsqrt(var + 1e-8),
    var the masked mean squared deviation times n / (n - 1)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 7, generator=g)
    mask = (torch.rand(3, 7, generator=g) > 0.3).float()
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / n * n / (n - 1)
    torch.testing.assert_close(whiten(x, mask), (x - mean) * torch.rsqrt(var + 1e-8) * mask, **TOL)
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), ((x - mean) * torch.rsqrt(var + 1e-8) + mean) * mask,
                               **TOL)


def test_ppo_gae_matches_schulman_2016():
    """GAE (Schulman et al. 2016, eq. 16): A_t = sum_l (gamma lambda)^l delta_{t+l},
    delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after the last step."""
    g = torch.Generator().manual_seed(10)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.float)
    rewards, values = torch.randn(2, 6, generator=g) * mask, torch.randn(2, 6, generator=g) * mask
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i in range(2):
        steps = mask[i].nonzero().squeeze(-1).tolist()
        v = values[i, steps].tolist() + [0.0]
        deltas = [rewards[i, t].item() + gamma * v[j + 1] - v[j] for j, t in enumerate(steps)]
        for j, t in enumerate(steps):
            want = sum((gamma * lam) ** l * d for l, d in enumerate(deltas[j:]))
            assert adv[i, t].item() == pytest.approx(want, abs=1e-6)
            assert ret[i, t].item() == pytest.approx(want + v[j], abs=1e-6)


def test_ppo_score_positions():
    """last_token: the score on the last response token (TRL 0.11's v1 PPOTrainer.compute_rewards);
    after_eos: one step past it, where TRL's later trainer puts it (``sequence_lengths_p1``)."""
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float)
    kl = torch.ones(2, 5)
    scores = torch.tensor([2.0, 3.0])
    last = token_rewards(scores, kl, mask, 0.5)
    assert last.tolist() == [[0, -0.5, 1.5, 0, 0], [-0.5, -0.5, -0.5, 2.5, 0]]
    after = last_token_mask(mask).roll(1, dims=1)
    past = token_rewards(scores, kl, mask, 0.5, score_mask=after)
    assert past.tolist() == [[0, -0.5, -0.5, 2.0, 0], [-0.5, -0.5, -0.5, -0.5, 3.0]]
