"""The config loader: the default file loads and gets defaults; every bad input names its key or file."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge.config import RENAMED, TrainConfig, apply_schema, check_config, load_config, load_schema
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
    ({"ppo": {"rollout_batch_size": 32, "batch_size": 5}},
     r"'ppo.batch_size' \(5\) must divide 'ppo.rollout_batch_size' \(32\)"),
    ({"grpo": {"rollout_batch_size": 4, "batch_size": 8}}, r"'grpo.batch_size' \(8\) must divide"),
    ({"ppo": {"grad_accum_steps": 2}}, r"'ppo.grad_accum_steps' \(2\) is not used by ppo"),
    ({"grpo": {"grad_accum_steps": 2}}, r"'grpo.grad_accum_steps' \(2\) is not used by grpo"),
    ({"dpo": {"label_smoothing": 0.1, "loss_type": "ipo"}}, r"'dpo.label_smoothing' \(0.1\) applies only to"),
    ({"grpo": {"samples_per_prompt": 1, "scale_rewards": "group"}},
     r"'grpo.samples_per_prompt' is 1 \(with 'grpo.scale_rewards': group\)"),
    ({"grpo": {"samples_per_prompt": 1, "scale_rewards": "none"}}, r"'grpo.samples_per_prompt' is 1 .*advantage 0"),
    ({"ppo": {"reward_fn": {"rm": 0}}}, r"'ppo.reward_fn': every weight .* is 0"),
    ({"score": {"reward_fn": {"hf": 1.0}}}, r"'score.reward_fn.hf_model' is required"),
    ({"star": {"warmup_steps": 40, "max_steps": 40}}, r"'star.warmup_steps' \(40\) must be smaller than 'star.max_steps'"),
    ({"sft": {"lora": {"double_quant": True}}}, r"'sft.lora.double_quant' is true but 'sft.lora.quantize' is null"),
    ({"dpo": {"lora": {"double_quant": True}}}, r"'dpo.lora.double_quant' is true"),
    ({"model": {"init_from": "hf:./no/such/folder"}, "tokenizer": {"type": "pretrained", "path": "x"}},
     r"'model.init_from' and 'tokenizer.type: pretrained' conflict"),
])
def test_cross_field_errors(override, message):
    with pytest.raises(LmforgeError, match=message):
        check_config(override)


def test_dpo_accumulates_like_every_other_stage():
    dpo = check_config({"dpo": {"batch_size": 4, "grad_accum_steps": 4}})["dpo"]
    assert (dpo["batch_size"], dpo["grad_accum_steps"]) == (4, 4)
    assert check_config({})["dpo"]["beta"] == 0.5  # once "null: 0.5", now the default itself


def test_rollout_batch_size_null_batch_is_the_whole_iteration():
    from lmforge.sections import GRPOConfig, PPOConfig

    grpo = GRPOConfig.from_dict(check_config({"grpo": {"rollout_batch_size": 6}})["grpo"], "grpo")
    assert (grpo.batch_size, grpo.n_minibatches, grpo.clip_range_high) == (6, 1, grpo.clip_range)
    ppo = PPOConfig.from_dict(check_config({"ppo": {"rollout_batch_size": 64, "batch_size": 16,
                                                    "ppo_epochs": 2}})["ppo"], "ppo")
    assert (ppo.n_minibatches, ppo.steps_per_iteration) == (4, 8)


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_a_renamed_key_is_an_error_naming_its_replacement(old):
    section, key = old.split(".")
    with pytest.raises(LmforgeError, match=rf"^config key '{old}' ") as e:
        check_config({section: {key: 1}})
    new = RENAMED[old]
    if " " not in new:  # a plain rename: the message names the new key, and the new key is valid
        assert str(e.value) == f"config key '{old}' was renamed to '{new}'"
        assert new.split(".")[1] in load_schema()["properties"][section]["properties"]


@pytest.mark.parametrize("old, says", [
    ("dpo.clip_range", "'dpo.beta'"), ("dpo.mini_batch_size", "'dpo.grad_accum_steps'"),
    ("ppo.mini_batch_size", "'ppo.rollout_batch_size'"), ("grpo.mini_batch_size", "'grpo.batch_size'"),
    ("sft.eval_steps", "delete the key"), ("reward.eval_steps", "delete the key"),
])
def test_a_removed_key_says_what_to_do(old, says):
    section, key = old.split(".")
    with pytest.raises(LmforgeError, match=f"config key '{old}'") as e:
        check_config({section: {key: 1}})
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_renamed_key_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("grpo:\n  grpo_temperature: 0.7\n")
    with pytest.raises(LmforgeError, match=rf"^{f}: config key 'grpo.grpo_temperature' was renamed to 'grpo.temperature'$"):
        load_config(f)


def test_every_schema_key_has_a_description():
    # The config reference page is generated from these.
    missing = []

    def walk(node: dict, path: str) -> None:
        for key, sub in node.get("properties", {}).items():
            if not sub.get("description"):
                missing.append(f"{path}{key}")
            walk(sub, f"{path}{key}.")
        for branch in node.get("anyOf", []) + node.get("oneOf", []):
            walk(branch, path)

    walk(load_schema(), "")
    assert missing == []


@pytest.mark.integration  # a fresh interpreter
def test_checking_the_default_config_does_not_import_torch():
    code = ("import sys, lmforge.config as c; c.load_config('config/config.yaml'); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('lmforge'))")
    subprocess.run([sys.executable, "-c", code], cwd=DEFAULT.parents[1], check=True)


def test_the_stage_modules_read_their_section_classes_from_one_place():
    # lmforge.model, lmforge.lora, lmforge.rewards and the train modules re-export the torch-free classes.
    from lmforge import sections
    from lmforge.lora import LoraConfig
    from lmforge.model import ModelConfig
    from lmforge.rewards import RewardSpec
    from lmforge.train.grpo import GRPOConfig
    from lmforge.train.star import StarConfig

    assert (LoraConfig, RewardSpec, GRPOConfig, StarConfig) == (
        sections.LoraConfig, sections.RewardSpec, sections.GRPOConfig, sections.StarConfig)
    assert ModelConfig is sections.ModelConfig
    config = check_config({"model": {"d_model": 64}})
    assert sections.SECTIONS["model"].check_config(config, "model") == ModelConfig.from_section(config["model"])


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
    from lmforge.config import coerce_strings

    text = {"seeds": ["1", "2"], "eval": {"samples_per_prompt": "0", "stages": ["sft", "dpo"]},
            "pretrain": {"lr": "1e-4", "compile": "true", "resume_from": "null"},
            "threads": "~", "grpo": {"lora": {"r": "8", "alpha": "16"}, "beta": "0"},
            "dpo": {"on_policy": "true", "loss_type": "ipo"}, "tokenizer": {"path": "123"},
            "resources": {"sft": {"mem_mb": "8000", "runtime": "2h"}}}
    typed = coerce_strings(text, load_schema())
    assert typed == {"seeds": [1, 2], "eval": {"samples_per_prompt": 0, "stages": ["sft", "dpo"]},
                     "pretrain": {"lr": 1e-4, "compile": True, "resume_from": None},
                     "threads": None, "grpo": {"lora": {"r": 8, "alpha": 16}, "beta": 0.0},
                     "dpo": {"on_policy": True, "loss_type": "ipo"}, "tokenizer": {"path": "123"},
                     "resources": {"sft": {"mem_mb": 8000, "runtime": "2h"}}}
    assert type(typed["grpo"]["lora"]["alpha"]) is float and type(typed["eval"]["samples_per_prompt"]) is int
    apply_schema(typed)  # valid now
    # Text that spells no allowed type stays text, and validation names its key.
    bad = coerce_strings({"eval": {"samples_per_prompt": "eight"}}, load_schema())
    assert bad == {"eval": {"samples_per_prompt": "eight"}}
    with pytest.raises(LmforgeError, match=r"config key 'eval.samples_per_prompt': expected integer, got 'eight'"):
        apply_schema(bad)
