"""The config loader: the default file loads and gets defaults; every bad input names its key or file."""

from pathlib import Path

import pytest
import yaml

from lmforge.config import TrainConfig, apply_schema, check_config, load_config, load_schema
from lmforge.errors import LmforgeError

DEFAULT = Path(__file__).resolve().parents[1] / "config" / "config.yaml"


def test_default_config_loads_and_fills_defaults():
    cfg = load_config(DEFAULT)
    with open(DEFAULT) as f:
        raw = yaml.safe_load(f)
    # Values written in the file survive unchanged.
    assert cfg["pretrain"]["lr"] == raw["pretrain"]["lr"]
    assert cfg["model"]["max_seq_len"] == raw["model"]["max_seq_len"]
    # Every schema key with a default is present, in every section.
    schema = load_schema()
    for section in ("model", "tokenizer", "pretrain", "tracking", "data"):
        assert set(schema["properties"][section]["properties"]) <= set(cfg[section]), section
    assert set(schema["properties"]["data"]["properties"]["builtin"]["properties"]) <= set(cfg["data"]["builtin"])


def test_empty_config_gets_schema_defaults():
    cfg = check_config({})
    schema = load_schema()["properties"]
    assert cfg["seed"] == schema["seed"]["default"]
    assert cfg["model"]["d_model"] == schema["model"]["properties"]["d_model"]["default"]
    assert cfg["pretrain"]["optimizer"] == "adamw"
    assert cfg["data"]["builtin"]["tasks"]["arithmetic"] == 0.5
    # Defaults are copies: filling one config must not alias the schema's lists.
    cfg["data"]["sources"].append("x")
    assert check_config({})["data"]["sources"] == ["builtin"]


def test_overrides_apply_dotted_keys():
    cfg = load_config(DEFAULT, overrides={"model.d_model": 64, "pretrain.max_steps": 7, "pretrain.warmup_steps": 2})
    assert cfg["model"]["d_model"] == 64 and cfg["pretrain"]["max_steps"] == 7


def test_unknown_top_level_key():
    with pytest.raises(LmforgeError, match="'modell'") as e:
        check_config({"modell": {}})
    assert "top level" in str(e.value)


def test_unknown_nested_key_names_section_and_key():
    with pytest.raises(LmforgeError) as e:
        load_config(DEFAULT, overrides={"pretrain.lrr": 0.1})
    msg = str(e.value)
    assert "'lrr'" in msg and "'pretrain'" in msg and str(DEFAULT) in msg
    assert "lr" in msg.split("allowed:")[1]  # the allowed keys are listed, so the typo is easy to spot


def test_wrong_type():
    with pytest.raises(LmforgeError, match=r"'model\.d_model'.*'big'"):
        check_config({"model": {"d_model": "big"}})


def test_d_model_not_divisible_by_heads():
    with pytest.raises(LmforgeError) as e:
        check_config({"model": {"d_model": 100, "n_heads": 3, "n_kv_heads": 1}})
    assert "model.d_model" in str(e.value) and "model.n_heads" in str(e.value)


def test_unknown_optimizer_lists_choices():
    with pytest.raises(LmforgeError) as e:
        check_config({"pretrain": {"optimizer": "sgdd"}})
    msg = str(e.value)
    assert "pretrain.optimizer" in msg and "'sgdd'" in msg
    for name in ("adamw", "adafactor", "lion", "sophia", "muon"):
        assert name in msg


def test_unknown_scheduler_lists_choices():
    with pytest.raises(LmforgeError) as e:
        check_config({"pretrain": {"scheduler": "step"}})
    msg = str(e.value)
    assert "pretrain.scheduler" in msg
    for name in ("none", "cosine", "linear", "polynomial"):
        assert name in msg


@pytest.mark.parametrize("warmup,steps", [(10, 10), (11, 10)])
def test_warmup_must_be_below_max_steps(warmup, steps):
    with pytest.raises(LmforgeError) as e:
        check_config({"pretrain": {"warmup_steps": warmup, "max_steps": steps}})
    assert "pretrain.warmup_steps" in str(e.value) and "pretrain.max_steps" in str(e.value)
    check_config({"pretrain": {"warmup_steps": steps - 1, "max_steps": steps}})  # the boundary is fine


def test_tokenizer_vocab_larger_than_model_vocab():
    with pytest.raises(LmforgeError) as e:
        check_config({"tokenizer": {"vocab_size": 4096}, "model": {"vocab_size": 2048}})
    assert "tokenizer.vocab_size" in str(e.value) and "model.vocab_size" in str(e.value)
    check_config({"tokenizer": {"vocab_size": 2048}, "model": {"vocab_size": 2048}})


def test_pretrained_tokenizer_needs_path():
    with pytest.raises(LmforgeError, match="tokenizer.path"):
        check_config({"tokenizer": {"type": "pretrained"}})


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(LmforgeError, match="not found") as e:
        load_config(missing)
    assert str(missing) in str(e.value)


def test_invalid_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1, 2\n")
    with pytest.raises(LmforgeError, match="not valid YAML") as e:
        load_config(bad)
    assert str(bad) in str(e.value)


def test_non_mapping_config(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(LmforgeError, match=str(f)):
        load_config(f)


def test_train_config_split():
    shared, own = TrainConfig.split({"lr": 0.1, "beta": 0.5})
    assert shared == {"lr": 0.1} and own == {"beta": 0.5}


def test_apply_schema_does_not_mutate_input():
    raw = {"model": {"d_model": 64}}
    apply_schema(raw)
    assert raw == {"model": {"d_model": 64}}


def test_override_into_empty_section(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n")  # a section with every key commented out loads as null
    assert load_config(f, overrides={"model.d_model": 64})["model"]["d_model"] == 64


def test_override_through_a_scalar_names_the_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\n")
    with pytest.raises(LmforgeError, match=r"seed\.x.*'seed' is not a section"):
        load_config(f, overrides={"seed.x": 1})


@pytest.mark.parametrize("override, message", [
    ({"dpo": {"mini_batch_size": 3}}, r"'dpo.mini_batch_size' \(3\) must divide 'dpo.batch_size' \(16\)"),
    ({"ppo": {"batch_size": 32, "mini_batch_size": 5}}, r"'ppo.mini_batch_size' \(5\) must divide 'ppo.batch_size' \(32\)"),
    ({"grpo": {"batch_size": 4, "mini_batch_size": 8}}, r"'grpo.mini_batch_size' \(8\) must divide"),
    ({"dpo": {"grad_accum_steps": 2}}, r"'dpo.grad_accum_steps' \(2\) is not used by dpo"),
    ({"dpo": {"label_smoothing": 0.1, "loss_type": "ipo"}}, r"'dpo.label_smoothing' \(0.1\) applies only to"),
    ({"grpo": {"group_size": 1, "scale_rewards": "group"}}, r"'grpo.group_size' is 1 \(with 'grpo.scale_rewards': group\)"),
    ({"grpo": {"group_size": 1, "scale_rewards": "none"}}, r"'grpo.group_size' is 1 .*advantage 0"),
    ({"dpo": {"beta": 0.1, "clip_range": 0.3}}, r"'dpo.beta' \(0.1\) and 'dpo.clip_range' \(0.3\) are both set and differ"),
    ({"ppo": {"reward_fn": {"rm": 0}}}, r"'ppo.reward_fn': every weight .* is 0"),
    ({"score": {"reward_fn": {"hf": 1.0}}}, r"'score.reward_fn.hf_model' is required"),
])
def test_alignment_cross_field_errors(override, message):
    with pytest.raises(LmforgeError, match=message):
        check_config(override)


@pytest.mark.parametrize("section, expected", [({}, 0.5), ({"beta": 0.3}, 0.3), ({"clip_range": 0.2}, 0.2),
                                               ({"beta": 0.2, "clip_range": 0.2}, 0.2)])
def test_dpo_beta_alias(section, expected):
    from lmforge.train.dpo import resolve_beta

    assert resolve_beta(check_config({"dpo": section})["dpo"]) == expected


@pytest.mark.parametrize("lora,message", [
    ({"r": 0}, r"config key 'sft.lora.r': 0 is less than the minimum of 1"),
    ({"rr": 1}, r"unknown config key\(s\) 'rr' in 'sft.lora'"),
    (3, r"config key 'sft.lora': expected one of \['null', 'object'\], got 3"),
])
def test_a_nullable_section_reports_the_objects_own_complaint(lora, message):
    with pytest.raises(LmforgeError, match=message):
        apply_schema({"sft": {"lora": lora}})
    assert apply_schema({"sft": {"lora": None}})["sft"]["lora"] is None


@pytest.mark.parametrize("override, message", [
    ({"dpo": {"rpo_alpha": -1}}, r"^config key 'dpo.rpo_alpha': -1 is less than the minimum of 0"),
    ({"sft": {"compile": "yes"}}, r"^config key 'sft.compile': expected boolean, got 'yes'"),
])
def test_new_training_knobs_name_their_key(override, message):
    with pytest.raises(LmforgeError, match=message):
        check_config(override)


def test_snakemake_config_text_is_typed_by_the_schema():
    # What `--config 'eval={...}' 'seeds=[1, 2]'` hands the Snakefile: YAML's base loader keeps
    # every nested scalar as text.
    from lmforge.workflow import coerce_strings

    text = {"seeds": ["1", "2"], "eval": {"pass_k": "0", "stages": ["sft", "dpo"]},
            "pretrain": {"lr": "1e-4", "compile": "true", "resume_from": "null"},
            "threads": "~", "grpo": {"lora": {"r": "8", "alpha": "16"}, "beta": "0"},
            "dpo": {"on_policy": "true", "loss_type": "ipo"}, "tokenizer": {"path": "123"},
            "resources": {"sft": {"mem_mb": "8000", "runtime": "2h"}}}
    typed = coerce_strings(text, load_schema())
    assert typed == {"seeds": [1, 2], "eval": {"pass_k": 0, "stages": ["sft", "dpo"]},
                     "pretrain": {"lr": 1e-4, "compile": True, "resume_from": None},
                     "threads": None, "grpo": {"lora": {"r": 8, "alpha": 16}, "beta": 0.0},
                     "dpo": {"on_policy": True, "loss_type": "ipo"}, "tokenizer": {"path": "123"},
                     "resources": {"sft": {"mem_mb": 8000, "runtime": "2h"}}}
    assert type(typed["grpo"]["lora"]["alpha"]) is float and type(typed["eval"]["pass_k"]) is int
    apply_schema(typed)  # valid now
    # Text that spells no allowed type stays text, and validation names its key.
    bad = coerce_strings({"eval": {"pass_k": "eight"}}, load_schema())
    assert bad == {"eval": {"pass_k": "eight"}}
    with pytest.raises(LmforgeError, match=r"config key 'eval.pass_k': expected integer, got 'eight'"):
        apply_schema(bad)
