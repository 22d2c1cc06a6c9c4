"""Hugging Face interop: export loads in transformers logit for logit, folders load back, init_from imports."""
import json

import pytest
import torch

from lmforge import hf, loader
from lmforge.checkpoint import save_model
from lmforge.cli import main
from lmforge.config import check_config
from lmforge.errors import LmforgeError
from lmforge.loader import load_model, read_checkpoint
from lmforge.model import ModelConfig, Transformer, yarn_attention_scale, yarn_frequencies
from lmforge.tokenizer import SPECIAL_TOKENS, LMTokenizer
from test_model import build

TEXTS = [f"The number {i} is {'even' if i % 2 == 0 else 'odd'} and {i * 3} is bigger." for i in range(300)]
BASE = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, rope_theta=5000.0)
CASES = {  # name -> (model overrides, the transformers class it must load as)
    "llama-gqa-tied": ({}, "LlamaForCausalLM"),
    "llama-mha-untied": (dict(attention_type="mha", n_kv_heads=None, tie_embeddings=False), "LlamaForCausalLM"),
    "llama-mqa": (dict(attention_type="mqa", n_kv_heads=None), "LlamaForCausalLM"),
    "qwen2-bias-untied": (dict(attention_bias=True, tie_embeddings=False), "Qwen2ForCausalLM"),
    "qwen2-bias-window": (dict(attention_bias=True, sliding_window=8), "Qwen2ForCausalLM"),
    "mistral-window": (dict(sliding_window=8), "MistralForCausalLM"),
}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is 4 even?"},
        {"role": "assistant", "content": "The number 4 is even."}]


@pytest.fixture(scope="module")
def tok():
    return LMTokenizer.train(TEXTS, vocab_size=300)


def saved(path, tok, **overrides):
    """A tiny model with non-trivial norms and biases, saved as model.pt. Returns (model, path)."""
    cfg = ModelConfig(**{**BASE, **overrides})
    model = build(cfg)
    save_model(path, model, kind="causal_lm", model_config=cfg.to_dict(), tokenizer=tok, meta={"stage": "test"})
    return model, path


def token_ids(n_vocab, seed=0):
    return torch.randint(0, n_vocab, (2, 32), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_export_loads_in_transformers_with_the_same_logits(case, tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    overrides, arch = CASES[case]
    model, ckpt = saved(tmp_path / "model.pt", tok, **overrides)
    out = loader.export(ckpt, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == arch and theirs.dtype == torch.float32
    ids = token_ids(BASE["vocab_size"])
    assert (theirs(input_ids=ids).logits - model(ids)).abs().max().item() <= 1e-4
    if model.cfg.window:  # the window is really applied on their side (it changes the logits here)
        unwindowed = Transformer(ModelConfig(**{**model.cfg.to_dict(), "sliding_window": None})).eval()
        unwindowed.load_state_dict(model.state_dict())
        assert (theirs(input_ids=ids).logits - unwindowed(ids)).abs().max().item() > 1e-3


def test_exported_files_tokenizer_chat_template_and_generation_config(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    _, ckpt = saved(tmp_path / "model.pt", tok)
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "generation_config.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 5000.0}
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (tok.bos_id, tok.end_id,
                                                                                       tok.pad_id)
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.temperature, gen.top_p, gen.do_sample) == (0.7, 0.9, True)
    assert gen.eos_token_id == [tok.end_id, tok.eos_id] and (gen.bos_token_id, gen.pad_token_id) == (tok.bos_id,
                                                                                                       tok.pad_id)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == ("<|bos|>", "<|end|>", "<|pad|>")
    assert list(theirs.apply_chat_template(CHAT, tokenize=True)["input_ids"]) == tok.render_chat(CHAT)[0]
    prompt = theirs.apply_chat_template(CHAT[:2], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert list(prompt) == tok.render_prompt(CHAT[:2])


def test_export_in_bfloat16_halves_the_weights(tmp_path, tok):
    from safetensors import safe_open

    model, ckpt = saved(tmp_path / "model.pt", tok)
    out = loader.export(ckpt, tmp_path / "hf", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    back, _, _ = load_model(out)
    with torch.no_grad():
        assert (back.eval()(token_ids(320)) - model(token_ids(320))).abs().max().item() < 0.05


@pytest.mark.parametrize("option, value, message", [
    ("positional_encoding", "alibi", r"model\.positional_encoding 'alibi' cannot be exported.*rope"),
    ("positional_encoding", "sinusoidal", r"model\.positional_encoding 'sinusoidal' cannot be exported"),
    ("positional_encoding", "learned", r"model\.positional_encoding 'learned' cannot be exported"),
    ("positional_encoding", "yarn", r"model\.positional_encoding 'yarn' cannot be exported.*differ"),
    ("norm_type", "layernorm", r"model\.norm_type 'layernorm' cannot be exported.*RMSNorm"),
    ("activation", "gelu", r"model\.activation 'gelu' cannot be exported.*swiglu"),
])
def test_export_refuses_what_llama_and_qwen2_cannot_compute(option, value, message, tmp_path, tok):
    extra = dict(original_max_seq_len=16, rope_scaling_factor=2.0) if value == "yarn" else {}
    _, ckpt = saved(tmp_path / "model.pt", tok, **{option: value}, **extra)
    with pytest.raises(LmforgeError, match=message):
        loader.export(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_yarn_is_refused_because_transformers_computes_other_frequencies():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=8192,
                                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                       "original_max_position_embeddings": 2048})
    theirs, their_scale = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours = yarn_frequencies(64, 10000.0, 4.0, 2048)
    assert their_scale == pytest.approx(yarn_attention_scale(4.0))  # the attention factor agrees ...
    assert (theirs - ours).abs().max().item() > 1e-3 * ours.max().item()  # ... the frequencies do not


# ----------------------------------------------------------------------------- reading a folder


@pytest.mark.parametrize("case", ["llama-gqa-tied", "llama-mha-untied", "qwen2-bias-window", "mistral-window"])
@torch.no_grad()
def test_round_trip_is_exact(case, tmp_path, tok):
    model, ckpt = saved(tmp_path / "model.pt", tok, **CASES[case][0])
    back, back_tok, back_ckpt = load_model(loader.export(ckpt, tmp_path / "hf"))
    assert back.cfg == model.cfg and back_tok.sha256 == tok.sha256
    assert back_ckpt["kind"] == "causal_lm" and back_ckpt["meta"]["stage"] == "hf_import"
    ids = token_ids(320)
    assert torch.equal(back.eval()(ids), model(ids))


def test_generate_and_chat_read_an_exported_folder(tmp_path, tok, capsys, monkeypatch):
    _, ckpt = saved(tmp_path / "model.pt", tok)
    out = loader.export(ckpt, tmp_path / "hf")
    args = ["--prompt", "Is 4 even?", "--max-new-tokens", "6", "--seed", "3"]
    assert main(["generate", str(ckpt), *args]) == 0
    from_pt = capsys.readouterr().out
    assert main(["generate", str(out), *args]) == 0
    assert capsys.readouterr().out == from_pt
    lines = iter(["Is 4 even?"])

    def typed(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # Ctrl-D ends the chat

    monkeypatch.setattr("builtins.input", typed)
    assert main(["chat", str(out), "--max-new-tokens", "4"]) == 0
    assert "model> " in capsys.readouterr().out


def test_expected_names_are_the_models_own():
    for overrides in ({}, dict(attention_bias=True, tie_embeddings=False)):
        cfg = ModelConfig(**{**BASE, **overrides})
        assert hf._expected_names(cfg) == set(Transformer(cfg).state_dict())


# ----------------------------------------------------------------------------- foreign models and tokenizers

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
          "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}"
          "{% endif %}{% endfor %}")


def foreign_tokenizer(folder, specials, **config):
    """A byte-level BPE with someone else's special tokens, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    t.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return t


@torch.no_grad()
def test_a_transformers_qwen2_with_a_chatml_tokenizer_imports(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "qwen"
    theirs_tok = foreign_tokenizer(folder, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=302, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 5000.0})
    theirs = transformers.Qwen2ForCausalLM(config).eval()
    theirs.save_pretrained(folder)

    ours, tok, _ = load_model(folder)
    vocab = theirs_tok.get_vocab()
    # Renamed in place (same ids, same trained rows): eos, and the chat template's turn end.
    assert tok.eos_id == vocab["<|endoftext|>"] and tok.end_id == vocab["<|im_end|>"]
    # New: bos (Qwen2 has none), pad (theirs is the eos) and the three role tokens, after the old ids.
    new = [tok.bos_id, tok.pad_id, *tok.role_ids.values()]
    assert sorted(new) == list(range(300, 305)) and ours.cfg.vocab_size == 305
    ids = token_ids(300)
    assert torch.equal(ours.eval()(ids)[..., :300], theirs(input_ids=ids).logits[..., :300])
    for mine, their in ((ours.embed_tokens, theirs.model.embed_tokens), (ours.lm_head, theirs.lm_head)):
        assert torch.allclose(mine.weight[new], their.weight[:300].mean(dim=0).expand(5, -1))
    assert tok.encode(TEXTS[7]) == theirs_tok.encode(TEXTS[7], add_special_tokens=False).ids


def test_a_llama2_style_tokenizer_keeps_bos_and_eos_and_gets_a_new_end(tmp_path):
    folder = tmp_path / "llama2"
    theirs = foreign_tokenizer(folder, ["<unk>", "<s>", "</s>"], bos_token="<s>",
                               eos_token={"content": "</s>", "special": True}, chat_template=LLAMA2)
    tok, new_ids = hf.convert_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id) == (theirs.token_to_id("<s>"), theirs.token_to_id("</s>"))
    # The template ends a turn with eos_token, which <|eos|> already took: <|end|> is a new token (as is pad).
    assert tok.end_id in new_ids and tok.pad_id in new_ids and len(new_ids) == 5
    assert tok.decode([tok.bos_id, *tok.encode("The number 4"), tok.eos_id]) == "The number 4"


def test_our_own_folder_converts_to_the_identical_tokenizer(tmp_path, tok):
    tok.save(tmp_path)
    again, new_ids = hf.convert_tokenizer(tmp_path)
    assert again.sha256 == tok.sha256 and new_ids == []


# ----------------------------------------------------------------------------- model.init_from


def test_init_from_a_folder_that_is_not_llama_or_qwen2(tmp_path):
    (tmp_path / "gpt").mkdir()
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "gpt" / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(LmforgeError, match=r"model\.init_from.*gpt/config\.json: model_type 'gpt2'.*GPT2LMHeadModel"):
        check_config({"model": {"init_from": f"hf:{tmp_path / 'gpt'}"}})


def test_init_from_a_folder_without_tokenizer(tmp_path, tok):
    _, ckpt = saved(tmp_path / "model.pt", tok)
    out = loader.export(ckpt, tmp_path / "hf")
    (out / "tokenizer.json").unlink()
    with pytest.raises(LmforgeError, match=rf"model\.init_from.*{out}: no tokenizer\.json"):
        check_config({"model": {"init_from": f"hf:{out}"}})
    with pytest.raises(LmforgeError, match=rf"{out}: no tokenizer\.json"):
        hf.import_tokenizer(f"hf:{out}")


def test_init_from_other_bad_values(tmp_path, tok):
    with pytest.raises(LmforgeError, match=r"model\.init_from.*no such folder"):
        check_config({"model": {"init_from": f"hf:{tmp_path / 'nope'}"}})
    with pytest.raises(LmforgeError, match=r"model\.init_from.*does not match '\^hf:"):
        check_config({"model": {"init_from": str(tmp_path)}})
    _, ckpt = saved(tmp_path / "model.pt", tok)
    out = loader.export(ckpt, tmp_path / "hf")
    with pytest.raises(LmforgeError, match=r"model\.init_from.*tokenizer\.type: pretrained"):
        check_config({"model": {"init_from": f"hf:{out}"}, "tokenizer": {"type": "pretrained", "path": "x"}})
    llama = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**llama, "rope_parameters": {"rope_type": "llama3"}}))
    with pytest.raises(LmforgeError, match=r"config\.json: rope_parameters.*llama3"):
        read_checkpoint(out)


@pytest.mark.integration  # three stages through the CLI: a small pipeline run
@torch.no_grad()
def test_tokenizer_and_pretrain_with_init_from_and_zero_steps_convert_exactly(tmp_path, tok, monkeypatch, capsys):
    model, ckpt = saved(tmp_path / "model.pt", tok, attention_bias=True, tie_embeddings=False)
    out = loader.export(ckpt, tmp_path / "hf")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(TEXTS[:40]):
        (docs / f"{i:03d}.txt").write_text(text)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"threads: 1\ndevice: cpu\ntracking: {{enabled: false}}\n"
                   f"data: {{sources: ['{docs}'], val_fraction: 0.2}}\n"
                   f"model: {{init_from: 'hf:{out}', max_seq_len: 32, d_model: 64}}\n"
                   f"pretrain: {{max_steps: 0, batch_size: 2, eval_steps: 1}}\n")
    monkeypatch.chdir(tmp_path)
    for stage in ("tokenizer", "tokenize", "pretrain"):
        assert main(["run", stage, "--config", str(cfg)]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "ignoring model.d_model: 64 (imported: 32)" in err
    stats = json.loads((tmp_path / "results/tokenizer/stats.json").read_text())
    assert stats["type"] == "init_from" and stats["tokenizer_sha256"] == tok.sha256
    converted, _, saved_ckpt = load_model(tmp_path / "results/pretrain/model.pt")
    assert converted.cfg == model.cfg and saved_ckpt["meta"]["step"] == 0
    ids = token_ids(320)
    assert torch.equal(converted.eval()(ids), model(ids))
    metrics = json.loads((tmp_path / "results/pretrain/metrics.json").read_text())
    assert metrics["steps"] == 0 and metrics["val_loss"] > 0


def test_pretrain_rejects_a_tokenizer_not_made_from_init_from(tmp_path, tok):
    from lmforge.stages.pretrain import build_model as pretrain_model

    _, ckpt = saved(tmp_path / "model.pt", tok)
    out = loader.export(ckpt, tmp_path / "hf")
    other = LMTokenizer.train(TEXTS[::-1][:50], vocab_size=290)
    with pytest.raises(LmforgeError, match="not the one of model.init_from.*rerun the tokenizer rule"):
        pretrain_model({"init_from": f"hf:{out}", "max_seq_len": 32}, other)


def test_a_hub_id_goes_through_snapshot_download(tmp_path, tok, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    _, ckpt = saved(tmp_path / "model.pt", tok)
    out = loader.export(ckpt, tmp_path / "hf")
    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        if repo_id != "someone/tiny":
            raise OSError("offline")
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert hf.import_tokenizer("hf:someone/tiny").sha256 == tok.sha256
    assert calls[0][0] == "someone/tiny" and "*.safetensors" in calls[0][1] and "tokenizer.json" in calls[0][1]
    with pytest.raises(LmforgeError, match=r"'hf:someone/else': not a local folder, and fetching .* failed .*offline"):
        hf.resolve("hf:someone/else")


OLD_CHAT_TEMPLATE = (  # the template before it marked the assistant's tokens; rendering must not change
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def test_exported_chat_template_gives_the_sft_loss_mask_as_assistant_mask(tmp_path, tok):
    """transformers' assistant mask of the exported tokenizer is render_chat's loss mask (assistant content and
    its <|end|>), so TRL's assistant-only SFT accepts the template; rendering without the flag is unchanged."""
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    conversations = [CHAT, CHAT + [{"role": "user", "content": "And 5?"}, {"role": "assistant", "content": "No."}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
                      {"role": "user", "content": "Say 12 + 4"}, {"role": "assistant", "content": "12 + 4 = 16"}]]
    for chat in conversations:
        ids, mask = tok.render_chat(chat)
        out = theirs.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert list(out["input_ids"]) == ids and list(out["assistant_masks"]) == mask
        for generation_prompt in (False, True):
            kw = dict(tokenize=False, add_generation_prompt=generation_prompt)
            assert theirs.apply_chat_template(chat, **kw) == theirs.apply_chat_template(
                chat, chat_template=OLD_CHAT_TEMPLATE, **kw)
    trl_templates = pytest.importorskip("trl.chat_template_utils")
    assert trl_templates.has_generation_markers(theirs.chat_template)
    assert trl_templates.is_chat_template_stop_token_trained(theirs)
    # An import still finds <|end|> as the turn end (the markers are no plain-jinja tags).
    assert hf._turn_end(theirs.chat_template, SPECIAL_TOKENS, "<|bos|>", "<|eos|>") == "<|end|>"
