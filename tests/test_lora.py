"""LoRA: the adapter layer against its formula, frozen base weights, the adapter-disabled reference,
adapter checkpoints (small, loadable, merged), bad input, the stages with LoRA/QLoRA, gradient
checkpointing and the 8-bit optimizer option."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import lmforge.model as model_lib
from lmforge.checkpoint import save_model
from lmforge.cli import main as cli
from lmforge.config import apply_schema
from lmforge.errors import LmforgeError
from lmforge.loader import load_model, merge_checkpoint, read_checkpoint, save_adapter
from lmforge.lora import BaseView, LoraConfig, LoRALinear, adapter_state, adapters_disabled, apply_lora
from lmforge.model import ModelConfig, RewardModel, Transformer
from lmforge.stages import dpo as dpo_stage
from lmforge.stages import grpo as grpo_stage
from lmforge.stages import ppo as ppo_stage
from lmforge.stages import reward as reward_stage
from lmforge.stages import sft as sft_stage
from lmforge.stages.common import training_options
from lmforge.tokenizer import LMTokenizer
from lmforge.train.optim import build_optimizer
from lmforge.train.policy import load_reference
from lmforge.workflow import StageEnv

BUILTIN = {"n_sft": 8, "n_pref": 8, "n_rl": 8, "n_val": 4, "tasks": {"arithmetic": 1.0, "string": 0.0, "docstring": 0.0}}
TRAIN = {"warmup_steps": 0, "max_steps": 2, "eval_every": 2, "checkpoint_every": 2, "log_every": 1, "batch_size": 2}


@pytest.fixture(scope="module")
def tok():
    texts = [f"What is {i} + {i % 7}? {i} + {i % 7} = {i + i % 7}. Reverse the word 'apple'." for i in range(300)]
    return LMTokenizer.train(texts, vocab_size=320)


def tiny(vocab=320, seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48)
    return Transformer(ModelConfig(**{**cfg, **overrides}))


def save_lm(path, model, tok):
    save_model(path, model, kind="causal_lm", model_config=model.cfg.to_dict(), tokenizer=tok, meta={})
    return path


def randomize_adapters(model, seed=1):
    """B starts at zero (the adapted model equals the base); give it values so the adapters matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def lm_step(model, opt, ids):
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


IDS = torch.randint(0, 320, (3, 20), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- the adapter layer


def test_lora_linear_is_the_low_rank_update_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, bias=True)
    layer = LoRALinear(base, r=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 5, 12)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    expected = x @ base.weight.detach().T + base.bias.detach() + (6.0 / 3) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.weight, base.weight + 2.0 * B @ A, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.merged()(x), expected, atol=1e-5, rtol=0)


def test_only_adapters_train_and_the_base_stays_bit_identical():
    model = tiny()
    before_logits = model(IDS).detach()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.testing.assert_close(model(IDS), before_logits, atol=0, rtol=0)  # B = 0: starts as the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{m}.lora_{ab}" for i in (0, 1)
                         for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for ab in "AB"}
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = build_optimizer(model, name="adamw", lr=1e-2, weight_decay=0.1)
    losses = [lm_step(model, opt, IDS) for _ in range(4)]
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())
    assert not torch.equal(model.layers[0].self_attn.q_proj.lora_B, torch.zeros_like(after["layers.0.self_attn.q_proj.lora_B"]))


def test_disabled_adapters_and_the_base_view_compute_the_base():
    model = tiny(dropout=0.2)
    base_logits = model.eval()(IDS).detach()
    apply_lora(model, LoraConfig(r=4))
    randomize_adapters(model)
    model.train()
    with adapters_disabled(model):
        torch.testing.assert_close(model.eval()(IDS), base_logits, atol=0, rtol=0)
    model.train()
    view = BaseView(model)
    out = view(IDS)  # eval mode inside (no dropout), no graph, the policy left in train mode
    torch.testing.assert_close(out, base_logits, atol=0, rtol=0)
    assert not out.requires_grad and model.training and view.cfg is model.cfg and not view.training
    assert view.eval() is view and view.train() is view
    assert (model.eval()(IDS) - base_logits).abs().max() > 1e-3  # adapters on again afterwards


# --------------------------------------------------------------------------- bad input


def test_a_target_that_matches_nothing_names_the_key_and_the_available_names():
    model = tiny(activation="gelu")  # no gate_proj in a non-gated MLP
    with pytest.raises(LmforgeError, match=r"'sft.lora.target_modules': 'gate_proj' matches no linear layer "
                                           r".*available: down_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        apply_lora(model, LoraConfig(target_modules=["q_proj", "gate_proj"]), key="sft.lora")


@pytest.mark.parametrize("r", [0, -2, 1.5])
def test_rank_must_be_a_positive_integer(r):
    with pytest.raises(LmforgeError, match=r"config key 'dpo.lora.r' \(.*\) must be a positive integer"):
        LoraConfig.from_dict({"r": r}, key="dpo.lora")
    with pytest.raises(LmforgeError, match=r"config key 'sft.lora.r'"):
        apply_schema({"sft": {"lora": {"r": 0}}})


def test_other_lora_config_errors():
    with pytest.raises(LmforgeError, match=r"'ppo.lora.double_quant' is true but 'ppo.lora.quantize' is null"):
        LoraConfig.from_dict({"double_quant": True}, key="ppo.lora")
    with pytest.raises(LmforgeError, match=r"unknown key\(s\) 'rank' in 'grpo.lora'"):
        LoraConfig.from_dict({"rank": 4}, key="grpo.lora")
    with pytest.raises(LmforgeError, match=r"'sft.lora.quantize' \('int4'\) must be null or 'nf4'"):
        LoraConfig.from_dict({"quantize": "int4"}, key="sft.lora")
    for section in ("sft", "reward", "dpo", "ppo", "grpo"):
        cfg = apply_schema({section: {"lora": {"r": 4, "quantize": "nf4"}, "gradient_checkpointing": True}})
        assert cfg[section]["lora"]["r"] == 4 and cfg[section]["gradient_checkpointing"] is True
    assert apply_schema({})["pretrain"]["gradient_checkpointing"] is False


# --------------------------------------------------------------------------- adapter checkpoints


@pytest.fixture
def adapted(tmp_path, tok):
    """(base path, adapter path, the adapted model in memory) for a LoRA model with non-zero adapters."""
    base_path = save_lm(tmp_path / "base" / "model.pt", tiny(tok.vocab_size), tok)
    model, _, ckpt = load_model(base_path)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]))
    randomize_adapters(model)
    adapter_path = tmp_path / "sft" / "model.pt"
    save_adapter(adapter_path, model, base=base_path, kind="causal_lm", model_config=ckpt["model_config"],
                 tokenizer=tok, meta={"stage": "sft"})
    return base_path, adapter_path, model.eval()


def test_adapter_checkpoint_is_small_and_loads_as_the_adapted_model(adapted, tok):
    base_path, adapter_path, model = adapted
    raw = torch.load(adapter_path, weights_only=False)
    assert raw["kind"] == "lora" and raw["base"] == "../base/model.pt" and len(raw["base_sha256"]) == 64
    assert set(raw["state_dict"]) == set(adapter_state(model)) and all("lora_" in k for k in raw["state_dict"])
    assert adapter_path.stat().st_size < base_path.stat().st_size / 3
    # Every consumer reads it as the adapted causal LM: same kind, tokenizer and logits.
    ckpt = read_checkpoint(adapter_path)
    assert ckpt["kind"] == "causal_lm" and ckpt["tokenizer_sha256"] == tok.sha256
    loaded, loaded_tok, _ = load_model(adapter_path)
    assert loaded_tok.sha256 == tok.sha256
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(IDS), model(IDS), atol=0, rtol=0)


def test_merge_gives_a_full_checkpoint_with_the_adapted_logits(adapted, tmp_path):
    _, adapter_path, model = adapted
    out = tmp_path / "merged.pt"
    assert cli(["merge", str(adapter_path), str(out)]) == 0
    merged, _, ckpt = load_model(out)
    assert ckpt["kind"] == "causal_lm" and ckpt["meta"]["merged_from"] == str(adapter_path)
    assert not any("lora" in k or ".base." in k for k in ckpt["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(IDS), model(IDS), atol=1e-5, rtol=0)


def test_export_of_an_adapter_checkpoint_writes_the_merged_weights(adapted, tmp_path):
    from safetensors.torch import load_file

    from lmforge.hf import WEIGHTS, hf_name
    from lmforge.loader import export

    _, adapter_path, _ = adapted
    merge_checkpoint(adapter_path, tmp_path / "merged.pt")
    merged = read_checkpoint(tmp_path / "merged.pt")["state_dict"]
    exported = load_file(str(export(adapter_path, tmp_path / "hf") / WEIGHTS))
    assert not any("lora" in k or ".base." in k for k in exported)
    for key, value in merged.items():
        if hf_name(key) in exported:
            torch.testing.assert_close(exported[hf_name(key)], value, atol=0, rtol=0, msg=key)
    assert hf_name("layers.0.self_attn.q_proj.weight") in exported


def test_merge_or_load_with_a_base_that_does_not_match_names_both_files(adapted, tmp_path, tok):
    base_path, adapter_path, _ = adapted
    other = save_lm(tmp_path / "other.pt", tiny(tok.vocab_size, seed=5), tok)  # same shapes, other weights
    with pytest.raises(LmforgeError, match=rf"adapters {adapter_path} were trained on a base with sha256 "
                                           rf"[0-9a-f]{{12}}, but {other} has sha256"):
        merge_checkpoint(adapter_path, tmp_path / "m.pt", base=other)
    wider = save_lm(tmp_path / "wider.pt", tiny(tok.vocab_size, d_model=64), tok)
    assert cli(["merge", str(adapter_path), str(tmp_path / "m.pt"), "--base", str(wider)]) == 1
    with pytest.raises(LmforgeError, match=rf"adapters {adapter_path} do not fit the base {wider}: d_model: 32 vs 64"):
        merge_checkpoint(adapter_path, tmp_path / "m.pt", base=wider)
    # The recorded base rewritten after training: loading the adapters refuses it too.
    save_lm(base_path, tiny(tok.vocab_size, seed=6), tok)
    with pytest.raises(LmforgeError, match=rf"{adapter_path} were trained on a base .* but {base_path} has"):
        load_model(adapter_path)
    with pytest.raises(LmforgeError, match="not a LoRA adapter checkpoint"):
        merge_checkpoint(other, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_reward_model_adapters_carry_the_fresh_head(tmp_path, tok):
    base_path = save_lm(tmp_path / "sft.pt", tiny(tok.vocab_size), tok)
    trunk, _, ckpt = load_model(base_path)
    apply_lora(trunk, LoraConfig(r=2))
    rm = RewardModel(trunk)
    randomize_adapters(rm)
    assert set(adapter_state(rm)) == {k for k in rm.state_dict() if "lora_" in k or k.startswith("score_head.")}
    save_adapter(tmp_path / "rm.pt", rm, base=base_path, kind="reward_model", model_config=ckpt["model_config"],
                 tokenizer=tok, meta={})
    loaded, _, ckpt = load_model(tmp_path / "rm.pt", kind="reward_model")
    assert ckpt["kind"] == "reward_model"
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(IDS), rm.eval()(IDS), atol=0, rtol=0)
    with pytest.raises(LmforgeError, match="is a reward_model checkpoint, but a causal language model"):
        load_model(tmp_path / "rm.pt")


# --------------------------------------------------------------------------- the stages


@pytest.fixture
def constructions(monkeypatch):
    """Every Transformer built while the test runs."""
    built = []
    real = Transformer.__init__

    def counting(self, cfg):
        built.append(cfg)
        real(self, cfg)

    monkeypatch.setattr(Transformer, "__init__", counting)
    return built


def run_stage(module, name, tmp_path, inputs, **section):
    params = apply_schema({name: {**TRAIN, **section}, "data": {"builtin": BUILTIN}, "seed": 3})
    params = {name: params[name], "data": {"builtin": params["data"]["builtin"]}, "seed": 3}
    env = StageEnv(stage=name, device="cpu", threads=1, tracking_enabled=False, ckpt_root=str(tmp_path / "ck"))
    outputs = {"model": str(tmp_path / name / "model.pt"), "metrics": str(tmp_path / name / "metrics.json")}
    return module.run(params, inputs, outputs, env), outputs["model"]


@pytest.mark.integration
def test_lora_and_qlora_stages_save_adapters_and_reuse_the_base_as_reference(tmp_path, tok, monkeypatch,
                                                                             constructions):
    pre = save_lm(tmp_path / "pretrain.pt", tiny(tok.vocab_size), tok)
    constructions.clear()
    loads = []

    def view_only(*args, **kw):  # the stages' reference must be the policy's base view, never a loaded copy
        reference = load_reference(*args, **kw)
        if not isinstance(reference, BaseView):
            loads.append(args)
            pytest.fail("loaded a copy of the reference")
        return reference

    for module in (ppo_stage, grpo_stage):
        monkeypatch.setattr(module, "load_reference", view_only)

    # SFT with LoRA: only adapters saved; the published model loads through its base.
    _, sft = run_stage(sft_stage, "sft", tmp_path, {"model": str(pre)}, lora={"r": 4})
    assert torch.load(sft, weights_only=False)["kind"] == "lora" and len(constructions) == 1
    # GRPO with QLoRA on the SFT adapters (trained on, then merged under new adapters). beta > 0 needs a
    # reference: the policy with its adapters off; no second Transformer, no loaded copy.
    constructions.clear()
    metrics, grpo = run_stage(grpo_stage, "grpo", tmp_path, {"policy": sft}, rollout_batch_size=2, samples_per_prompt=2,
                              max_new_tokens=4, beta=0.1, lora={"r": 4, "quantize": "nf4"})
    assert len(constructions) == 1 and not loads and metrics["steps"] == 2
    model, _, ckpt = load_model(grpo)  # grpo adapters -> sft adapters -> pretrain
    assert ckpt["adapter"]["base"] == sft and ckpt["adapter"]["lora"]["quantize"] == "nf4"
    # PPO with LoRA: the critic copies the adapted policy (adapters of its own); the reference is the view.
    constructions.clear()
    metrics, ppo = run_stage(ppo_stage, "ppo", tmp_path, {"policy": str(pre)}, rollout_batch_size=2, batch_size=2,
                             ppo_epochs=1, max_new_tokens=4, reward_fn={"rm": 0.0, "verifiable": 1.0},
                             lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    assert len(constructions) == 1 and not loads
    assert metrics["heldout"]["sampled"]["sft"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert torch.load(ppo, weights_only=False)["kind"] == "lora"


@pytest.mark.integration
def test_dpo_and_reward_stages_with_lora(tmp_path, tok, constructions):
    pre = save_lm(tmp_path / "sft.pt", tiny(tok.vocab_size), tok)
    constructions.clear()
    base_bytes = pre.read_bytes()
    metrics, dpo = run_stage(dpo_stage, "dpo", tmp_path, {"policy": str(pre)}, batch_size=2,
                             lora={"r": 4}, gradient_checkpointing=True)
    assert len(constructions) == 1  # no reference path: reference log-probs from the policy before training
    raw = torch.load(dpo, weights_only=False)
    assert raw["kind"] == "lora" and raw["model_kind"] == "causal_lm" and pre.read_bytes() == base_bytes
    load_model(dpo)
    metrics, rm = run_stage(reward_stage, "reward", tmp_path, {"model": str(pre)}, lora={"r": 2})
    raw = torch.load(rm, weights_only=False)
    assert raw["model_kind"] == "reward_model" and any(k.startswith("score_head.") for k in raw["state_dict"])
    model, _, _ = load_model(rm, kind="reward_model")
    assert 0 <= metrics["val_accuracy"] <= 1


# --------------------------------------------------------------------------- memory options


@pytest.mark.parametrize("lora", [None, {"r": 4}, {"r": 4, "quantize": "nf4"}])
def test_gradient_checkpointing_leaves_gradients_unchanged(lora, monkeypatch):
    calls = []
    real = model_lib.checkpoint
    monkeypatch.setattr(model_lib, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    grads = []
    for flag in (False, True):
        model = training_options(tiny(dropout=0.1), {"lora": lora, "gradient_checkpointing": flag}, "sft")
        if lora:
            randomize_adapters(model)
        model.train()
        torch.manual_seed(11)  # the same dropout masks; checkpointing replays them in the recompute
        loss = F.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert len(calls) == 2  # one per block, only in the checkpointed run
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=0, msg=name)
    # Not in eval or under no_grad (generation): the plain loop.
    model.eval()
    with torch.no_grad():
        model(IDS)
    assert len(calls) == 2


def test_adamw8bit_is_a_clear_error_without_bitsandbytes_or_cuda(monkeypatch):
    model = tiny()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(LmforgeError, match=r"sft.optimizer: 'adamw8bit' needs the bitsandbytes package"):
        build_optimizer(model, name="adamw8bit", lr=1e-3, key="sft.optimizer")
    fake = types.ModuleType("bitsandbytes.optim")
    fake.AdamW8bit = object
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", fake)
    with pytest.raises(LmforgeError, match=r"dpo.optimizer: 'adamw8bit' \(bitsandbytes\) runs on CUDA only, "
                                           r"but the model is on cpu"):
        build_optimizer(model, name="adamw8bit", lr=1e-3, key="dpo.optimizer")
    assert apply_schema({"ppo": {"optimizer": "adamw8bit"}})["ppo"]["optimizer"] == "adamw8bit"
