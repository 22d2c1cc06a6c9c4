"""The shared training loop: exact resume, NaN guard, resume checks, early stopping."""
import numpy as np
import pytest
import torch

from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.train.lm import TokenWindows, evaluate_lm, lm_loss
from lmforge.train.loop import train

MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16)


@pytest.fixture
def tokens(tmp_path):
    rng = np.random.default_rng(0)
    # A learnable sequence: mostly a repeating pattern, with some noise.
    data = np.tile(np.arange(64, dtype=np.uint16), 200)
    flip = rng.random(len(data)) < 0.1
    data[flip] = rng.integers(0, 64, flip.sum())
    path = tmp_path / "train.bin"
    data.tofile(path)
    return path


def run(tokens, ckpt_dir, model_cfg=MODEL, batch_fn_wrap=None, loss_wrap=None, eval_fn=None, **train_kw):
    torch.manual_seed(0)
    mcfg = ModelConfig.from_dict(model_cfg)
    model = Transformer(mcfg)
    knobs = dict(lr=3e-3, warmup_steps=2, max_steps=12, batch_size=4, eval_every=4, eval_steps=2,
                 checkpoint_every=4, log_every=100, dropout=None)
    knobs.pop("dropout")
    knobs.update(train_kw)
    cfg = TrainConfig.from_dict(knobs, key="pretrain")
    windows = TokenWindows(tokens, "uint16", mcfg.max_seq_len, cfg.batch_size, seed=3, device="cpu")
    batch_fn = batch_fn_wrap(windows.batch) if batch_fn_wrap else windows.batch
    loss_fn = loss_wrap(lm_loss) if loss_wrap else lm_loss
    result = train(model, stage="pretrain", cfg=cfg, model_config=mcfg.to_dict(), batch_fn=batch_fn,
                   loss_fn=loss_fn, eval_fn=eval_fn or (lambda m: evaluate_lm(m, windows, 2, 1.0)),
                   ckpt_dir=ckpt_dir, device=torch.device("cpu"), fingerprint={"data": "x"})
    return model, result


def final_loss(model, tokens):
    windows = TokenWindows(tokens, "uint16", 16, 4, seed=99, device="cpu")
    return evaluate_lm(model.eval(), windows, 4, 1.0)["val_loss"]


def test_resume_after_kill_equals_uninterrupted_run(tokens, tmp_path):
    full_model, full = run(tokens, tmp_path / "full")

    class Killed(Exception):
        pass

    def dies_after_step_8(batch):
        def fn(step, micro):
            if step == 8:  # the checkpoint of step 8 is on disk; the process "dies" here
                raise Killed()
            return batch(step, micro)
        return fn

    with pytest.raises(Killed):
        run(tokens, tmp_path / "split", batch_fn_wrap=dies_after_step_8)
    resumed_model, resumed = run(tokens, tmp_path / "split")
    assert resumed.resumed_from == 8 and resumed.step == 12
    assert abs(final_loss(full_model, tokens) - final_loss(resumed_model, tokens)) < 1e-5
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_nan_loss_stops_with_last_checkpoint_intact(tokens, tmp_path):
    def nan_at_step_7(loss_fn):
        calls = {"n": 0}

        def fn(model, batch):
            calls["n"] += 1
            loss, m = loss_fn(model, batch)
            return (loss * float("nan") if calls["n"] == 7 else loss), m
        return fn

    with pytest.raises(LmforgeError, match=r"non-finite loss .* at step 7.*last good checkpoint is intact"):
        run(tokens, tmp_path / "ck", loss_wrap=nan_at_step_7)
    state = torch.load(tmp_path / "ck" / "last.pt", weights_only=False)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_extending_max_steps_resumes(tokens, tmp_path):
    run(tokens, tmp_path / "ck", max_steps=8)
    _, result = run(tokens, tmp_path / "ck", max_steps=12)
    assert result.resumed_from == 8 and result.step == 12


def test_changed_settings_start_fresh(tokens, tmp_path):
    run(tokens, tmp_path / "ck", max_steps=8)
    _, result = run(tokens, tmp_path / "ck", max_steps=8, lr=1e-3)
    assert result.resumed_from is None and result.step == 8


def test_resume_from_checkpoint_of_other_model_config_fails(tokens, tmp_path):
    run(tokens, tmp_path / "a", max_steps=4)
    other = {**MODEL, "d_model": 64}
    with pytest.raises(LmforgeError, match=r"different model config \(d_model: 32 in checkpoint vs 64 now"):
        run(tokens, tmp_path / "b", model_cfg=other, resume_from=str(tmp_path / "a" / "last.pt"))


def test_switching_optimizer_needs_fresh_optimizer(tokens, tmp_path):
    run(tokens, tmp_path / "a", max_steps=4)
    last = str(tmp_path / "a" / "last.pt")
    with pytest.raises(LmforgeError, match="resume_optimizer: false"):
        run(tokens, tmp_path / "b", optimizer="lion", lr=3e-4, resume_from=last)
    _, result = run(tokens, tmp_path / "b", optimizer="lion", lr=3e-4, resume_from=last,
                    resume_optimizer=False, max_steps=8)
    assert result.resumed_from == 4 and result.step == 8


def test_early_stopping(tokens, tmp_path):
    # A val loss that only gets worse after the first eval: patience 2 stops at the third eval.
    vals = iter([3.0, 3.5, 3.6, 3.7, 3.8])
    _, result = run(tokens, tmp_path / "ck", patience=2, max_steps=40, eval_fn=lambda m: {"val_loss": next(vals)})
    assert result.stopped_early and result.step == 12 and result.best_step == 4


def test_resume_missing_checkpoint(tokens, tmp_path):
    with pytest.raises(LmforgeError, match="pretrain.resume_from.*not found"):
        run(tokens, tmp_path / "ck", resume_from=str(tmp_path / "nope.pt"))


def test_threads_default_to_the_slurm_allocation_or_the_cpu_affinity(monkeypatch):
    import os

    from lmforge.device import available_cores, set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        assert available_cores() == 1
        set_threads(None)
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("SLURM_CPUS_PER_TASK")
        assert available_cores() == len(os.sched_getaffinity(0))
        set_threads(3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
