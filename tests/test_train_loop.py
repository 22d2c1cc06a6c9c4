"""The shared training loop: exact resume (or none), NaN guard, resume checks, early stopping."""
import re

import numpy as np
import pytest
import torch

from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.train.lm import TokenWindows, evaluate_lm, lm_loss
from lmforge.train.loop import final_weights, train

MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tokens")
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


def published(result, **train_kw):
    """The weights a stage publishes after this run (best or last, as the stage would pick)."""
    return final_weights(result, TrainConfig.from_dict({"max_steps": 12, "warmup_steps": 2, **train_kw}, key="t"))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit


@pytest.fixture(scope="module")
def fresh(tokens, tmp_path_factory):
    """Weights (in memory, and published) of an uninterrupted run from an empty checkpoint folder, by max_steps."""
    cache = {}

    def get(max_steps):
        if max_steps not in cache:
            model, result = run(tokens, tmp_path_factory.mktemp(f"fresh{max_steps}"), max_steps=max_steps)
            cache[max_steps] = (model.state_dict(), published(result))
        return cache[max_steps]
    return get


def set_aside_files(ckpt_dir):
    return sorted(p.name for p in (ckpt_dir / "set-aside").glob("*.pt"))


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
    assert final_loss(full_model, tokens) == final_loss(resumed_model, tokens)
    assert_same_weights(full_model.state_dict(), resumed_model.state_dict())
    assert_same_weights(published(full), published(resumed))
    assert resumed.best_step == full.best_step and resumed.history[:-1] == full.history[:-1]  # (the last: speed)


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


def test_shorter_max_steps_sets_the_longer_run_aside_and_equals_a_fresh_run(tokens, tmp_path, fresh, capsys):
    run(tokens, tmp_path / "ck", max_steps=30)
    capsys.readouterr()
    model, result = run(tokens, tmp_path / "ck", max_steps=12)
    assert result.resumed_from is None and result.step == 12
    assert [n.split("-")[0] for n in set_aside_files(tmp_path / "ck")] == ["best", "last"]  # both, kept together
    [last] = (tmp_path / "ck" / "set-aside").glob("last-*.pt")
    assert torch.load(last, weights_only=False)["step"] == 30  # kept, not deleted
    lines = [line for line in capsys.readouterr().err.splitlines() if "set-aside" in line]
    assert len(lines) == 1 and str(last) in lines[0] and "max_steps 30 → 12" in lines[0]
    assert_same_weights(model.state_dict(), fresh(12)[0])
    assert_same_weights(published(result), fresh(12)[1])


def test_longer_max_steps_after_a_finished_run_equals_a_fresh_run(tokens, tmp_path, fresh):
    run(tokens, tmp_path / "ck", max_steps=12)
    model, result = run(tokens, tmp_path / "ck", max_steps=20)
    assert result.resumed_from is None and result.step == 20  # the cosine schedule of 12 steps is not 20's
    assert set_aside_files(tmp_path / "ck")[0].startswith("best-")
    assert_same_weights(model.state_dict(), fresh(20)[0])
    assert_same_weights(published(result, max_steps=20), fresh(20)[1])


def test_rerun_of_a_finished_run_resumes_it_and_trains_nothing(tokens, tmp_path, fresh):
    run(tokens, tmp_path / "ck")
    model, result = run(tokens, tmp_path / "ck", checkpoint_every=5, log_every=3)  # knobs that change nothing
    assert result.resumed_from == 12 and result.step == 12
    assert_same_weights(published(result), fresh(12)[1])


def test_truncated_checkpoints_are_set_aside_with_a_warning(tokens, tmp_path, fresh, capsys):
    ck = tmp_path / "ck"
    run(tokens, ck)
    for name in ("last.pt", "best.pt"):  # each in turn: a checkpoint cut short (a full disk, a copy killed)
        data = (ck / name).read_bytes()
        (ck / name).write_bytes(data[: len(data) // 2])
        capsys.readouterr()
        model, result = run(tokens, ck)
        warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert len(warnings) == 1 and f"{ck / name} is unreadable" in warnings[0], warnings
        assert re.search(rf"moved to {re.escape(str(ck))}/set-aside/last-\S+\.pt", warnings[0])
        assert result.resumed_from is None and result.step == 12
        assert_same_weights(published(result), fresh(12)[1])
    assert len(set_aside_files(ck)) == 4


def test_unreadable_checkpoint_to_publish_is_named(tokens, tmp_path):
    _, result = run(tokens, tmp_path / "ck", max_steps=4)
    (tmp_path / "ck" / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LmforgeError, match=r"best\.pt is unreadable"):
        published(result, max_steps=4)


def test_nan_message_never_names_a_checkpoint_of_another_run(tokens, tmp_path):
    run(tokens, tmp_path / "ck", max_steps=4, lr=1e-3)  # another run's last.pt

    def nan_at_once(loss_fn):
        return lambda model, batch: (loss_fn(model, batch)[0] * float("nan"), {})

    with pytest.raises(LmforgeError, match=r"at step 1; .*intact: none yet") as e:
        run(tokens, tmp_path / "ck", loss_wrap=nan_at_once)
    assert "last.pt" not in str(e.value)


def test_changed_settings_start_fresh(tokens, tmp_path):
    run(tokens, tmp_path / "ck", max_steps=8)
    _, result = run(tokens, tmp_path / "ck", max_steps=8, lr=1e-3)
    assert result.resumed_from is None and result.step == 8


def test_resume_from_extends_a_finished_run_and_its_interrupted_extension_resumes(tokens, tmp_path):
    run(tokens, tmp_path / "a", max_steps=8)
    src = str(tmp_path / "a" / "last.pt")
    whole, result = run(tokens, tmp_path / "b", max_steps=12, resume_from=src)
    assert result.resumed_from == 8 and result.step == 12

    class Killed(Exception):
        pass

    def dies_at_10(batch):
        def fn(step, micro):
            if step == 10:
                raise Killed()
            return batch(step, micro)
        return fn

    with pytest.raises(Killed):
        run(tokens, tmp_path / "c", max_steps=12, resume_from=src, checkpoint_every=2, batch_fn_wrap=dies_at_10)
    again, result = run(tokens, tmp_path / "c", max_steps=12, resume_from=src, checkpoint_every=2)
    assert result.resumed_from == 10  # its own last.pt, a run started from the same file
    assert_same_weights(again.state_dict(), whole.state_dict())
    # Without resume_from that last.pt is another run's: set aside.
    _, result = run(tokens, tmp_path / "c", max_steps=12)
    assert result.resumed_from is None and set_aside_files(tmp_path / "c")


def test_resume_from_inside_the_runs_own_checkpoint_folder_is_refused(tokens, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "last.pt").write_bytes(b"x")
    with pytest.raises(LmforgeError, match=r"pretrain.resume_from.*copy it elsewhere"):
        run(tokens, tmp_path / "ck", resume_from=str(tmp_path / "ck" / "last.pt"))


def test_resume_fingerprint_is_canonical_and_covers_params_and_input_files(tmp_path):
    from lmforge.stages.common import resume_fingerprint
    from lmforge.train.loop import fingerprint_of

    data = tmp_path / "train.bin"
    data.write_bytes(b"abc")
    cfg = TrainConfig.from_dict({"max_steps": 12}, key="pretrain")
    params = {"seed": 1, "code": "c0ffee", "pretrain": {"lr": 0.1, "max_steps": 12, "checkpoint_every": 5},
              "model": {"d_model": 8, "n_layers": 1}}

    def fp(params, **extra):
        return fingerprint_of(cfg, {"d_model": 8}, resume_fingerprint(params, {"train": str(data)}, **extra))

    base = fp(params)
    reordered = {"model": {"n_layers": 1, "d_model": 8}, "pretrain": dict(reversed(params["pretrain"].items())),
                 "code": "c0ffee", "seed": 1}
    assert fp(reordered) == base
    assert fp({**params, "pretrain": {**params["pretrain"], "checkpoint_every": 1, "log_every": 3}}) == base
    for changed in ({**params, "seed": 2}, {**params, "code": "beef"},
                    {**params, "pretrain": {**params["pretrain"], "max_steps": 30}}):
        assert fp(changed)["sha256"] != base["sha256"]
    assert fp(params, round=2)["sha256"] != base["sha256"]
    data.write_bytes(b"abd")
    assert fp(params)["sha256"] != base["sha256"]


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
    # A rerun resumes the stopped run and stays stopped, as the uninterrupted run did.
    _, again = run(tokens, tmp_path / "ck", patience=2, max_steps=40, eval_fn=lambda m: {"val_loss": 0.0})
    assert again.resumed_from == 12 and again.step == 12 and again.stopped_early and again.best_step == 4


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


def test_pretrain_stage_publishes_what_a_fresh_run_of_the_current_config_would(tmp_path, capsys):
    """Through the stage: a longer run's checkpoint is never published for a shorter config, and a
    changed input file (same config) sets the checkpoint aside too."""
    from dataclasses import asdict

    from lmforge.data.corpus import tokenize_corpus
    from lmforge.loader import load_model
    from lmforge.stages import pretrain
    from lmforge.tokenizer import LMTokenizer
    from lmforge.workflow import StageEnv

    docs = [f"Document {i} talks about the number {i * 7} and the word {'abc'[i % 3]}. " * 3 for i in range(80)]
    tok = LMTokenizer.train(docs, vocab_size=320)
    tok.save(tmp_path / "tok")
    tokenize_corpus(tok, docs, tmp_path / "data", val_fraction=0.2, sources=[])
    inputs = {"tokenizer": str(tmp_path / "tok" / "tokenizer.json"), "train": str(tmp_path / "data" / "train.bin"),
              "val": str(tmp_path / "data" / "val.bin"), "meta": str(tmp_path / "data" / "meta.json")}

    def stage(ckpt_root: str, max_steps: int) -> tuple[dict, dict]:
        section = asdict(TrainConfig.from_dict(dict(lr=3e-3, warmup_steps=2, max_steps=max_steps, batch_size=4,
                                                    eval_every=6, eval_steps=2, checkpoint_every=6), key="pretrain"))
        params = {"seed": 7, "code": "abc", "model": {**MODEL, "vocab_size": 320, "max_seq_len": 32},
                  "pretrain": section}
        out = tmp_path / f"out-{ckpt_root}-{max_steps}"
        outputs = {"model": str(out / "model.pt"), "metrics": str(out / "metrics.json")}
        env = StageEnv("pretrain", seed=7, device="cpu", threads=1, tracking_enabled=False,
                       ckpt_root=str(tmp_path / ckpt_root))
        metrics = pretrain.run(params, inputs, outputs, env)
        return metrics, load_model(outputs["model"])[0].state_dict()

    stage("ck", 30)
    metrics, weights = stage("ck", 12)
    assert metrics["steps"] == 12 and metrics["resumed_from"] is None
    fresh_metrics, fresh_weights = stage("fresh", 12)
    assert_same_weights(weights, fresh_weights)
    assert metrics["val_loss"] == fresh_metrics["val_loss"]

    train_bin = tmp_path / "data" / "train.bin"
    train_bin.write_bytes(np.fromfile(train_bin, dtype=np.uint16)[::-1].tobytes())  # same size, other content
    capsys.readouterr()
    metrics, _ = stage("ck", 12)
    assert metrics["resumed_from"] is None
    assert "its settings differ: input train" in capsys.readouterr().err
