"""Tokenizer and tokenize stages run by hand (the CLI path): BPE training and adopting an existing tokenizer."""
import json

import numpy as np
import pytest

from lmforge.cli import main


def write(tmp_path, tok_section: str) -> str:
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    for i in range(60):
        (docs / f"{i:03d}.txt").write_text(f"Document {i} talks about the number {i * 7} and the word {'abc'[i % 3]}.")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"tracking: {{enabled: false}}\ndata: {{sources: ['{docs}'], val_fraction: 0.2}}\n"
                   f"tokenizer: {tok_section}\nmodel: {{vocab_size: 400}}\n")
    return str(cfg)


@pytest.mark.integration
def test_bpe_then_pretrained_gives_the_same_tokenizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "tokenizer", "--config", write(tmp_path, "{vocab_size: 330}")]) == 0
    stats = json.loads((tmp_path / "results/tokenizer/stats.json").read_text())
    assert stats["type"] == "bpe" and stats["vocab_size"] <= 330 and stats["heldout_bytes_per_token"] > 1
    (tmp_path / "keep.json").write_text((tmp_path / "results/tokenizer/tokenizer.json").read_text())
    cfg = write(tmp_path, f"{{type: pretrained, path: '{tmp_path / 'keep.json'}'}}")
    assert main(["run", "tokenizer", "--config", cfg]) == 0
    again = json.loads((tmp_path / "results/tokenizer/stats.json").read_text())
    assert again["type"] == "pretrained" and again["tokenizer_sha256"] == stats["tokenizer_sha256"]

    assert main(["run", "tokenize", "--config", cfg]) == 0
    meta = json.loads((tmp_path / "results/data/pretrain/meta.json").read_text())
    train = np.fromfile(tmp_path / "results/data/pretrain/train.bin", dtype=meta["dtype"])
    assert len(train) == meta["train_tokens"] and meta["train_docs"] + meta["val_docs"] == 60


def test_missing_pretrained_tokenizer_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, f"{{type: pretrained, path: '{tmp_path / 'nope' / 'tokenizer.json'}'}}")
    assert main(["run", "tokenizer", "--config", cfg]) == 1
    assert "nope/tokenizer.json" in capsys.readouterr().err
    assert not (tmp_path / "results/tokenizer/tokenizer.json").exists()
