"""Checkpoints: atomic writes, model round trips, and errors that name the file."""

import hashlib

import pytest
import torch

from lmforge.checkpoint import atomic_torch_save, save_model
from lmforge.errors import LmforgeError
from lmforge.files import atomic_write_json, atomic_write_text, file_sha256
from lmforge.loader import load_model, read_checkpoint
from lmforge.model import ModelConfig, RewardModel, Transformer
from lmforge.tokenizer import LMTokenizer


@pytest.fixture(scope="module")
def tok() -> LMTokenizer:
    texts = [f"the {a} {b} sat on the {c}." for a in ("cat", "dog", "fox") for b in ("big", "small")
             for c in ("mat", "rug", "bed")] * 5
    return LMTokenizer.train(texts, vocab_size=300)


@pytest.fixture(scope="module")
def cfg(tok) -> ModelConfig:
    return ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle me")


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_atomic_writes_leave_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "sub" / "a.txt", "héllo")
    atomic_write_json(tmp_path / "sub" / "b.json", {"z": 1, "a": [1, 2]})
    atomic_torch_save({"t": torch.arange(3)}, tmp_path / "sub" / "c.pt")
    assert (tmp_path / "sub" / "a.txt").read_text() == "héllo"
    assert (tmp_path / "sub" / "b.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "z": 1\n}\n'
    assert torch.equal(torch.load(tmp_path / "sub" / "c.pt")["t"], torch.arange(3))
    assert leftovers(tmp_path / "sub") == []


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "model.pt"
    atomic_torch_save({"version": 1}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle me"):
        atomic_torch_save({"version": 2, "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert torch.load(path)["version"] == 1
    assert leftovers(tmp_path) == []


def test_save_load_model_round_trip(tmp_path, tok, cfg):
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    path = tmp_path / "pretrain" / "model.pt"
    save_model(path, model, kind="causal_lm", model_config=cfg.to_dict(), tokenizer=tok,
               meta={"stage": "pretrain", "step": 7})
    assert leftovers(path.parent) == []

    again, tok2, ckpt = load_model(path)
    assert isinstance(again, Transformer) and not isinstance(again, RewardModel)
    assert ckpt["meta"] == {"stage": "pretrain", "step": 7} and ckpt["kind"] == "causal_lm"
    assert ckpt["tokenizer_sha256"] == tok.sha256 == tok2.sha256
    assert tok2.encode("the cat sat") == tok.encode("the cat sat")
    ids = torch.tensor([tok.document(tok.encode("the big dog sat on the rug."))[:16]])
    with torch.no_grad():
        assert torch.equal(again.eval()(ids), model(ids))


def test_reward_model_round_trip_and_kind_mismatch(tmp_path, tok, cfg):
    torch.manual_seed(1)
    rm = RewardModel(Transformer(cfg)).eval()
    path = tmp_path / "reward" / "model.pt"
    save_model(path, rm, kind="reward_model", model_config=cfg.to_dict(), tokenizer=tok, meta={})
    with pytest.raises(LmforgeError) as e:
        load_model(path, kind="causal_lm")
    assert str(path) in str(e.value) and "reward_model" in str(e.value) and "causal language model" in str(e.value)
    again, _, _ = load_model(path, kind="reward_model")
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(again.eval()(ids), rm(ids))


def test_causal_lm_refused_where_reward_model_needed(tmp_path, tok, cfg):
    path = tmp_path / "model.pt"
    save_model(path, Transformer(cfg), kind="causal_lm", model_config=cfg.to_dict(), tokenizer=tok, meta={})
    with pytest.raises(LmforgeError, match="is a causal_lm checkpoint, but a reward model is needed") as e:
        load_model(path, kind="reward_model")
    assert str(path) in str(e.value)


def test_foreign_and_broken_files(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(LmforgeError, match="not an lmforge checkpoint") as e:
        load_model(foreign)
    assert str(foreign) in str(e.value)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a zip or pickle")
    with pytest.raises(LmforgeError, match="not a readable checkpoint") as e:
        read_checkpoint(garbage)
    assert str(garbage) in str(e.value)

    missing = tmp_path / "missing.pt"
    with pytest.raises(LmforgeError, match="checkpoint not found") as e:
        load_model(missing)
    assert str(missing) in str(e.value)


def test_file_sha256_of_file_is_plain_sha256(tmp_path):
    f = tmp_path / "x.bin"
    data = bytes(range(256)) * 5000  # > 1 MiB, so several chunks
    f.write_bytes(data)
    assert file_sha256(f) == hashlib.sha256(data).hexdigest()


def test_file_sha256_of_folder(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("one")
    (d / "sub" / "b.txt").write_text("two")
    h0 = file_sha256(d)
    assert file_sha256(d) == h0  # deterministic

    (d / "sub" / "b.txt").write_text("twO")
    h1 = file_sha256(d)
    assert h1 != h0
    (d / "sub" / "b.txt").write_text("two")
    assert file_sha256(d) == h0  # content, not mtime

    (d / "sub" / "b.txt").rename(d / "sub" / "c.txt")
    assert file_sha256(d) != h0  # names count
    (d / "sub" / "c.txt").rename(d / "sub" / "b.txt")
    (d / "new.txt").write_text("")
    assert file_sha256(d) != h0  # an added empty file counts

    # Name/content boundaries are unambiguous.
    e1, e2 = tmp_path / "e1", tmp_path / "e2"
    e1.mkdir(), e2.mkdir()
    (e1 / "a").write_text("bc")
    (e2 / "ab").write_text("c")
    assert file_sha256(e1) != file_sha256(e2)
