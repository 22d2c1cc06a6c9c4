"""Multi-process training: data shards, the rank-0-only writes, and 2 gloo processes against 1.

The 2-process runs start real process groups (torch.multiprocessing spawn, or
torchrun through ``distributed.launch``); each costs a few seconds of imports,
so they are marked integration. Tolerance: every logged step loss of the 2-process run
within 1e-4 relative of the 1-process run with the same global batch (the sums
are only reordered: observed differences are ~1e-7).
"""
import json
import os
import pickle
import socket
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import distributed
from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.pipeline import process_settings
from lmforge.train.dpo import DPOBatches, DPOExample, dpo_loss, pair_completions
from lmforge.train.lm import TokenWindows, evaluate_lm, lm_loss
from lmforge.train.loop import train
from lmforge.train.sft import Example, SFTBatches, evaluate_sft

MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16)
RTOL = 1e-4


# --------------------------------------------------------------------------- no process group


@pytest.fixture
def as_rank(monkeypatch):
    """Pretend to be ``rank`` of ``world`` processes (for the helpers that only ask who they are)."""
    def set_(rank, world):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda: rank)
    return set_


def test_shard_takes_this_ranks_rows_of_every_layout(as_rank):
    x = torch.arange(8 * 3).view(8, 3)
    as_rank(1, 2)
    xs, ys = distributed.shard((x, x + 100))
    assert torch.equal(xs, x[4:]) and torch.equal(ys, x[4:] + 100)
    as_rank(2, 4)
    d = distributed.shard({"input_ids": x, "targets": x * 2, "n_real": 17})
    assert torch.equal(d["input_ids"], x[4:6]) and torch.equal(d["targets"], x[4:6] * 2)
    assert d["n_real"] == 17  # numbers describe the whole micro-batch: kept


def test_shard_reads_dpo_pairs_as_chosen_then_rejected_blocks(as_rank):
    examples = [DPOExample([1, 2], [3 + i], [40 + i, 41]) for i in range(4)]
    full = {"completions": pair_completions(examples, pad_id=0), "ref_chosen": torch.arange(4.0),
            "index": torch.arange(4)}
    as_rank(1, 2)
    part = distributed.shard(full)
    mine = pair_completions(examples[2:], pad_id=0)
    # Rank 1 gets pairs 2 and 3: their chosen rows and their rejected rows (padded to the whole batch's width).
    assert torch.equal(part["completions"].input_ids[:, :mine.input_ids.shape[1]], mine.input_ids)
    assert torch.equal(part["completions"].response_mask[:, :mine.response_mask.shape[1]], mine.response_mask)
    assert torch.equal(part["ref_chosen"], torch.tensor([2.0, 3.0]))
    assert torch.equal(part["index"], torch.tensor([2, 3]))


def test_world_size_that_does_not_divide_the_batch_is_named(as_rank):
    as_rank(0, 3)
    with pytest.raises(LmforgeError, match=r"config key 'sft.batch_size' \(4\) is not divisible by the "
                                           r"number of processes \(3, distributed.nproc\)"):
        distributed.check_batch(4, "sft.batch_size")
    with pytest.raises(LmforgeError, match=r"'pretrain.batch_size' \(8\) is not divisible .*\(3"):
        distributed.shard(torch.zeros(8, 2), "pretrain.batch_size")


def test_nproc_comes_from_distributed_then_the_rules_gpus():
    assert process_settings({}, "pretrain") == {"nproc": 1, "strategy": "ddp"}
    assert process_settings({"distributed": {"nproc": 2, "strategy": "fsdp"}}, "sft") == {"nproc": 2,
                                                                                            "strategy": "fsdp"}
    per_rule = {"distributed": {"nproc": {"pretrain": 4}}}
    assert process_settings(per_rule, "pretrain")["nproc"] == 4
    assert process_settings(per_rule, "dpo")["nproc"] == 1
    gpus = {"resources": {"default": {"gpu": None}, "pretrain": {"gpu": 8}}}
    assert process_settings(gpus, "pretrain")["nproc"] == 8 and process_settings(gpus, "sft")["nproc"] == 1
    # Only pretrain, sft and dpo can run under torchrun; the other rules stay one process.
    assert process_settings({"distributed": {"nproc": 2}, "resources": {"ppo": {"gpu": 2}}}, "ppo")["nproc"] == 1
    with pytest.raises(LmforgeError, match="distributed.nproc"):
        process_settings({"distributed": {"nproc": 0}}, "sft")
    with pytest.raises(LmforgeError, match="'distributed.strategy': 'zero'"):
        distributed.configure("zero")


def test_threads_are_split_between_local_processes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.process_threads(8) == 4 and distributed.process_threads(1) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert distributed.process_threads(8) == 8 and distributed.process_threads(None) is None


def test_checkpoint_of_another_world_size_is_refused_with_the_fix(as_rank):
    as_rank(0, 1)
    with pytest.raises(LmforgeError, match=r"last.pt was written by a run with 2 process\(es\) \(ddp\), this run has "
                                           r"1 process\(es\). Rerun with distributed.nproc: 2 and "
                                           r"distributed.strategy: ddp to resume it"):
        distributed.check_resume({"world_size": 2, "strategy": "ddp"}, "x/last.pt", "pretrain")
    distributed.check_resume({}, "x/last.pt", "pretrain")  # a checkpoint from before: one process


# --------------------------------------------------------------------------- scenarios (1 or 2 processes)


class Recorder:
    """A stand-in for the MLflow run: the per-step training loss."""

    def __init__(self):
        self.losses = []

    def log_metrics(self, metrics, step):
        if "loss" in metrics:
            self.losses.append(metrics["loss"])


def _cfg(**kw):
    knobs = dict(lr=3e-3, warmup_steps=2, max_steps=6, batch_size=4, eval_every=3, eval_steps=2,
                 checkpoint_every=3, log_every=100)
    return TrainConfig.from_dict({**knobs, **kw}, key="pretrain")


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_dict({**MODEL, **kw}))


def _train(model, cfg, batch_fn, loss_fn, eval_fn, ckpt):
    rec = Recorder()
    result = train(model, stage="pretrain", cfg=cfg, model_config=model.cfg.to_dict(), batch_fn=batch_fn,
                   loss_fn=loss_fn, eval_fn=eval_fn, ckpt_dir=ckpt, device=torch.device("cpu"),
                   fingerprint={"data": "x"}, run=rec)
    return rec.losses, [h["val_loss"] for h in result.history if "val_loss" in h]


def lm_scenario(work: Path, ckpt: Path, **kw):
    windows = TokenWindows(work / "tokens.bin", "uint16", MODEL["max_seq_len"], 4, seed=3, device="cpu")
    return _train(_model(), _cfg(grad_accum_steps=2, **kw), windows.batch, lm_loss,
                  lambda m: evaluate_lm(m, windows, 2, 1.0), ckpt)


def sft_scenario(work: Path, ckpt: Path):
    from lmforge.stages.sft import rank_sft_loss

    g = torch.Generator().manual_seed(5)
    examples = []
    for i in range(24):  # uneven lengths and trained-token counts: ranks see different token counts
        n = int(torch.randint(4, 16, (1,), generator=g))
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        k = int(torch.randint(1, n - 1, (1,), generator=g))
        examples.append(Example(ids, [0] * k + [1] * (n - k)))
    batches = SFTBatches(examples, seq_len=16, batch_size=4, pad_id=0, seed=1, packing=False)
    val = SFTBatches(examples[:8], seq_len=16, batch_size=4, pad_id=0, seed=1, packing=False)
    return _train(_model(), _cfg(), batches.batch, rank_sft_loss(pad_id=0), lambda m: evaluate_sft(m, val), ckpt)


def dpo_scenario(work: Path, ckpt: Path):
    from lmforge.train.dpo import evaluate_dpo

    g = torch.Generator().manual_seed(6)

    def ids(n):
        return torch.randint(1, 64, (n,), generator=g).tolist()

    examples = [DPOExample(ids(3 + i % 4), ids(2 + i % 3), ids(1 + i % 5)) for i in range(16)]
    ref = -torch.rand(16, 2, generator=g) * 10
    batches = DPOBatches(examples, ref, batch_size=4, pad_id=0, seed=2)
    return _train(_model(), _cfg(), batches.batch, lambda m, b: dpo_loss(m, b, beta=0.1),
                  lambda m: evaluate_dpo(m, batches, beta=0.1), ckpt)


class Killed(Exception):
    pass


def resume_scenario(work: Path, ckpt: Path):
    """Dropout on (per-rank random streams); killed after the step-3 checkpoint, then rerun."""
    windows = TokenWindows(work / "tokens.bin", "uint16", MODEL["max_seq_len"], 4, seed=3, device="cpu")

    def dies_at_3(step, micro):
        if step == 3:
            raise Killed()
        return windows.batch(step, micro)

    def go(batch_fn, where):
        model = _model(dropout=0.1)
        out = _train(model, _cfg(), batch_fn, lm_loss, None, where)
        return out[0], [p.detach().clone() for p in model.parameters()]

    full, full_params = go(windows.batch, ckpt / "full")
    try:
        go(dies_at_3, ckpt / "split")
    except Killed:
        pass
    resumed, resumed_params = go(windows.batch, ckpt / "split")
    return {"full": full, "resumed": resumed,
            "param_diff": max((a - b).abs().max().item() for a, b in zip(full_params, resumed_params))}


def indivisible_scenario(work: Path, ckpt: Path):
    try:
        lm_scenario(work, ckpt, batch_size=3)
    except LmforgeError as e:
        return str(e)


SCENARIOS = {"lm": lm_scenario, "sft": sft_scenario, "dpo": dpo_scenario, "resume": resume_scenario,
             "indivisible": indivisible_scenario}


def _worker(rank: int, world: int, port: int, strategy: str, names: list, work: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.configure(strategy)
    distributed.init(torch.device("cpu"))
    work = Path(work)
    out = {name: SCENARIOS[name](work, work / f"ckpt-{strategy}-{name}") for name in names}
    if rank == 0:
        (work / f"out-{strategy}.pkl").write_bytes(pickle.dumps(out))
    distributed.shutdown()


def run_two(work: Path, strategy: str, names: list) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_worker, args=(2, port, strategy, names, str(work)), nprocs=2,
                                          join=True, start_method="spawn")
    return pickle.loads((work / f"out-{strategy}.pkl").read_bytes())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    data = np.tile(np.arange(64, dtype=np.uint16), 100)
    flip = rng.random(len(data)) < 0.1
    data[flip] = rng.integers(0, 64, flip.sum())
    data.tofile(work / "tokens.bin")
    return work


def one(work: Path, name: str, tag: str):
    """The scenario in this process (world size 1), in a checkpoint folder of its own."""
    torch.set_num_threads(1)
    return SCENARIOS[name](work, work / f"ckpt-one-{tag}-{name}")


def assert_same_curve(two, one_):
    losses2, val2 = two
    losses1, val1 = one_
    assert len(losses2) == len(losses1) == 6
    np.testing.assert_allclose(losses2, losses1, rtol=RTOL)
    np.testing.assert_allclose(val2, val1, rtol=RTOL)


@pytest.fixture(scope="module")
def ddp(work):
    return run_two(work, "ddp", ["lm", "sft", "dpo", "resume", "indivisible"])


@pytest.mark.integration
@pytest.mark.parametrize("name", ["lm", "sft", "dpo"])
def test_two_ddp_processes_give_the_one_process_loss_curve(ddp, work, name):
    # lm: grad accumulation 2; sft: ranks hold different numbers of trained tokens; dpo: chosen/rejected rows.
    assert_same_curve(ddp[name], one(work, name, "ddp"))


@pytest.mark.integration
def test_ddp_resume_at_the_same_world_size_is_exact(ddp):
    r = ddp["resume"]
    assert len(r["resumed"]) == 3  # steps 4..6 after resuming at step 3
    np.testing.assert_allclose(r["resumed"], r["full"][3:], rtol=1e-6)
    assert r["param_diff"] < 1e-6


@pytest.mark.integration
def test_ddp_checkpoint_records_its_world_and_is_refused_by_one_process(ddp, work):
    state = torch.load(work / "ckpt-ddp-lm" / "last.pt", weights_only=False)
    assert state["world_size"] == 2 and state["strategy"] == "ddp" and len(state["rng_ranks"]) == 2
    assert not any(k.startswith("module.") for k in state["model"])  # the plain model's keys
    with pytest.raises(LmforgeError, match=r"written by a run with 2 process\(es\) \(ddp\), this run has 1"):
        lm_scenario(work, work / "ckpt-ddp-lm")


@pytest.mark.integration
def test_ddp_batch_not_divisible_by_world_size(ddp):
    assert ddp["indivisible"].startswith("config key 'pretrain.batch_size' (3) is not divisible by the number of "
                                         "processes (2, distributed.nproc)")


@pytest.mark.integration
def test_two_fsdp_processes_give_the_one_process_loss_curve(work):
    two = run_two(work, "fsdp", ["lm", "sft"])
    for name in ("lm", "sft"):
        assert_same_curve(two[name], one(work, name, "fsdp"))
    state = torch.load(work / "ckpt-fsdp-lm" / "last.pt", weights_only=False)
    assert state["strategy"] == "fsdp" and set(state["model"]) == set(_model().state_dict())


# --------------------------------------------------------------------------- the stage through torchrun


def _pretrain_inputs(tmp_path: Path, monkeypatch) -> dict:
    from lmforge.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(80):
        (docs / f"{i:03d}.txt").write_text(f"Document {i} talks about the number {i * 7} and the word "
                                           f"{'abc'[i % 3]}. " * 3)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"tracking: {{enabled: false}}\nseed: 7\ndata: {{sources: ['{docs}'], val_fraction: 0.2}}\n"
                   f"tokenizer: {{vocab_size: 320}}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "tokenizer", "--config", str(cfg)]) == 0
    assert main(["run", "tokenize", "--config", str(cfg)]) == 0
    data = tmp_path / "results/data/pretrain"
    return {"tokenizer": str(tmp_path / "results/tokenizer/tokenizer.json"), "train": str(data / "train.bin"),
            "val": str(data / "val.bin"), "meta": str(data / "meta.json")}


@pytest.mark.integration
def test_pretrain_stage_under_torchrun_matches_one_process(tmp_path, monkeypatch):
    from lmforge.workflow import StageEnv

    inputs = _pretrain_inputs(tmp_path, monkeypatch)
    params = {"seed": 7, "model": {**MODEL, "vocab_size": 320, "max_seq_len": 32},
              "pretrain": asdict(_cfg(max_steps=4, eval_every=2, checkpoint_every=2))}
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        outputs = {"model": str(out / "model.pt"), "metrics": str(out / "metrics.json")}
        env = StageEnv("pretrain", seed=7, device="cpu", threads=1 if nproc == 1 else 2, tracking_enabled=nproc == 2,
                       tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", ckpt_root=str(tmp_path / f"ck{nproc}"))
        results[nproc] = distributed.launch("pretrain", params, inputs, outputs, env, nproc=nproc)
        assert json.loads(Path(outputs["metrics"]).read_text())["world_size"] == nproc
    one_, two = results[1], results[2]
    assert one_["steps"] == two["steps"] == 4
    for h1, h2 in zip(one_["history"], two["history"]):
        assert h2["val_loss"] == pytest.approx(h1["val_loss"], rel=RTOL)
    assert two["val_loss"] == pytest.approx(one_["val_loss"], rel=RTOL)
    # Rank 0 alone tracks: one MLflow run, the one metrics.json names.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.run_id for r in runs] == [two["mlflow_run_id"]]


@pytest.mark.integration
def test_a_workers_error_comes_back_as_one_message(tmp_path):
    from lmforge.workflow import StageEnv

    env = StageEnv("pretrain", device="cpu", tracking_enabled=False, ckpt_root=str(tmp_path))
    inputs = {k: str(tmp_path / "missing") for k in ("tokenizer", "train", "val", "meta")}
    params = {"seed": 1, "model": MODEL, "pretrain": asdict(_cfg())}
    with pytest.raises(LmforgeError) as err:
        distributed.launch("pretrain", params, inputs, {"model": "m", "metrics": "x"}, env, nproc=2)
    assert "missing" in str(err.value) and "\n" not in str(err.value)
