"""The lmforge console command and the pretrain stage's model checks."""
import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, RewardModel, Transformer
from lmforge.stages.pretrain import build_model
from lmforge.tokenizer import LMTokenizer

MODEL = dict(vocab_size=320, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64)


@pytest.fixture(scope="module")
def tok():
    texts = [f"The number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(300)]
    return LMTokenizer.train(texts, vocab_size=300)


def test_generate_prints_completion(tmp_path, tok, capsys):
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(MODEL)
    path = tmp_path / "model.pt"
    save_model(path, Transformer(cfg), kind="causal_lm", model_config=cfg.to_dict(), tokenizer=tok, meta={})
    rc = main(["generate", str(path), "--prompt", "What is 2?", "--temperature", "0", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("> What is 2?\n")


@pytest.mark.integration  # torch.compile: inductor builds C++ with the system compiler
def test_generate_compiled_prints_the_same_completion(tmp_path, tok, capsys, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(MODEL)
    path = tmp_path / "model.pt"
    save_model(path, Transformer(cfg), kind="causal_lm", model_config=cfg.to_dict(), tokenizer=tok, meta={})
    args = ["generate", str(path), "--prompt", "What is 2?", "--temperature", "0", "--max-new-tokens", "12"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    from torch._dynamo.utils import counters

    counters.clear()
    assert main([*args, "--compile"]) == 0
    assert capsys.readouterr().out == eager
    assert counters["stats"]["unique_graphs"] >= 1  # the step did go through the compiler


def test_generate_on_reward_model_fails_clearly(tmp_path, tok, capsys):
    cfg = ModelConfig.from_dict(MODEL)
    path = tmp_path / "reward.pt"
    save_model(path, RewardModel(Transformer(cfg)), kind="reward_model", model_config=cfg.to_dict(),
               tokenizer=tok, meta={})
    assert main(["generate", str(path), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "reward_model checkpoint" in err and "causal language model" in err and str(path) in err


def test_run_with_bad_config_names_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pretrain:\n  optimizer: adamx\n")
    assert main(["run", "pretrain", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert str(cfg) in err and "pretrain.optimizer" in err and "adamw" in err


def test_tokenizer_larger_than_model_vocab(tok):
    with pytest.raises(LmforgeError, match=r"tokenizer has \d+ tokens but 'model.vocab_size' is 200"):
        build_model({**MODEL, "vocab_size": 200}, tok)
