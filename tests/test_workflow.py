"""The Snakemake workflow end to end on the tiny config: staleness, tracking, errors, kill + resume."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
TINY = yaml.safe_load((REPO / "tests" / "data" / "tiny.yaml").read_text())
pytestmark = pytest.mark.integration


def write_config(workdir: Path, **overrides) -> Path:
    cfg = json.loads(json.dumps(TINY))
    for dotted, value in overrides.items():
        node = cfg
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake(workdir: Path, *args, check=True, target="results/pretrain/model.pt"):
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
           str(workdir / "config.yaml"), "--cores", "1", *args, target]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def executed(proc) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):", proc.stdout + proc.stderr, re.M))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("wf")
    write_config(workdir, threads=None)  # torch's threads left to the rule (see the MLflow test)
    first = snakemake(workdir)
    return workdir, first


def test_first_run_builds_every_stage(built):
    workdir, first = built
    assert executed(first) == {"tokenizer", "tokenize", "pretrain"}
    metrics = json.loads((workdir / "results/pretrain/metrics.json").read_text())
    assert metrics["steps"] == TINY["pretrain"]["max_steps"]
    assert metrics["val_loss"] < 5.8  # below log(320) = 5.77 +: the model learned something
    meta = json.loads((workdir / "results/data/pretrain/meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["train_tokens"] > 0
    log = (workdir / "results/logs/pretrain.log").read_text()
    assert log.count("pretrain: model has") == 1  # the stage's own lines, once each
    assert log.count("[pretrain] flops/token") == 1 and "[pretrain] memory" in log  # the estimate at start


def test_second_run_does_nothing(built):
    workdir, _ = built
    proc = snakemake(workdir)
    assert executed(proc) == set()
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_the_same_config_with_its_keys_reordered_reruns_nothing(built):
    # As a YAML tool that sorts keys would write it back: only a changed value makes a stage stale.
    workdir, _ = built
    path = write_config(workdir, threads=None)
    cfg = yaml.safe_load(path.read_text())
    reverse = lambda v: {k: reverse(v[k]) for k in reversed(list(v))} if isinstance(v, dict) else v
    path.write_text(yaml.safe_dump(reverse(cfg), sort_keys=False))
    proc = snakemake(workdir, "-n", target="all")
    assert "Params have changed" not in proc.stdout + proc.stderr
    assert executed(snakemake(workdir)) == set()
    assert (workdir / "results/tokenizer/tokenizer_config.json").exists()  # a declared output of the tokenizer


def test_changing_a_pretrain_knob_reruns_only_pretrain(built):
    workdir, _ = built
    write_config(workdir, **{"pretrain.lr": 2e-3})
    assert executed(snakemake(workdir)) == {"pretrain"}


def test_changing_a_tokenizer_knob_reruns_tokenizer_tokenize_pretrain(built):
    workdir, _ = built
    write_config(workdir, **{"pretrain.lr": 2e-3, "tokenizer.vocab_size": 310})
    assert executed(snakemake(workdir)) == {"tokenizer", "tokenize", "pretrain"}
    write_config(workdir, **{"pretrain.lr": 2e-3, "tokenizer.vocab_size": 310})
    assert executed(snakemake(workdir)) == set()


def test_task_data_knobs_do_not_touch_the_pretraining_stages(built):
    workdir, _ = built
    write_config(workdir, **{"pretrain.lr": 2e-3, "tokenizer.vocab_size": 310, "data.builtin.n_sft": 150})
    assert not {"tokenizer", "tokenize", "pretrain"} & executed(snakemake(workdir))


def test_mlflow_has_a_run_per_stage_with_lineage(built):
    from mlflow.tracking import MlflowClient

    workdir, _ = built
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'results/mlflow.db'}")
    exp = client.get_experiment_by_name("lmforge-test")
    runs = client.search_runs([exp.experiment_id])
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.info.run_name, []).append(r)
    assert {"tokenizer", "tokenize", "pretrain"} <= set(by_stage)
    pre = sorted(by_stage["pretrain"], key=lambda r: r.info.start_time)[-1]
    assert pre.info.status == "FINISHED"
    assert pre.data.params["pretrain.optimizer"] == "adamw" and "model.d_model" in pre.data.params
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_ppl", "val_bpb"} <= set(pre.data.metrics)
    assert pre.data.tags["snakemake.rule"] == "pretrain"
    # threads: null -> torch follows the rule's threads (Snakemake's OMP_NUM_THREADS: 1 under --cores 1),
    # not every core of the machine
    assert pre.data.tags["torch.threads"] == "1"
    tok_run = pre.data.tags["lineage.tokenizer.run_id"]
    assert client.get_run(tok_run).info.run_name == "tokenizer"
    assert len(pre.data.tags["lineage.train.sha256"]) == 64
    history = client.get_metric_history(pre.info.run_id, "loss")
    assert len(history) == TINY["pretrain"]["max_steps"]
    artifacts = {a.path for a in client.list_artifacts(pre.info.run_id)}
    assert {"metrics.json", "pretrain.log", "config.json", "lineage.json"} <= artifacts


def test_bad_config_fails_before_any_work(tmp_path):
    write_config(tmp_path, **{"model.d_model": 30, "model.n_heads": 4})
    proc = snakemake(tmp_path, check=False)
    assert proc.returncode != 0
    assert "model.d_model" in proc.stderr + proc.stdout and "model.n_heads" in proc.stderr + proc.stdout
    assert not (tmp_path / "results").exists()


def test_nested_config_on_the_command_line_is_typed(tmp_path):
    # Snakemake leaves numbers inside --config dicts and lists as text; the Snakefile types them.
    write_config(tmp_path)
    proc = snakemake(tmp_path, "-n", "--config", 'eval={"stages": ["pretrain"], "samples_per_prompt": 0}',
                     "seeds=[1, 2]", "--", target="results/seeds/summary.md")
    assert {"seeds_summary", "seed1_pretrain", "seed2_pretrain"} <= executed(proc)
    proc = snakemake(tmp_path, "-n", "--config", 'eval={"samples_per_prompt": "eight"}', "--", check=False)
    assert proc.returncode != 0 and "'eight' is not of type 'integer'" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_bad_data_path_fails_with_the_path(tmp_path):
    write_config(tmp_path, **{"data.sources": [str(tmp_path / "missing.jsonl")]})
    proc = snakemake(tmp_path, check=False)
    assert proc.returncode != 0
    assert "missing.jsonl" in (tmp_path / "results/logs/tokenizer.log").read_text()
    assert not (tmp_path / "results/tokenizer/tokenizer.json").exists()


def test_kill_9_then_rerun_resumes_from_checkpoint(tmp_path):
    write_config(tmp_path, **{"pretrain.max_steps": 2000, "pretrain.checkpoint_every": 20,
                              "pretrain.eval_every": 0})
    snakemake(tmp_path, target="results/data/pretrain/meta.json")
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
           str(tmp_path / "config.yaml"), "--cores", "1", "results/pretrain/model.pt"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = tmp_path / "results/.checkpoints/pretrain/last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (tmp_path / "results/pretrain/model.pt").exists()
    import torch

    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < killed_at < 2000
    # kill -9 leaves Snakemake's lock behind: unlock, then the same command again
    # (the default profile adds --rerun-incomplete) resumes from the checkpoint.
    snakemake(tmp_path, "--unlock")
    snakemake(tmp_path)
    metrics = json.loads((tmp_path / "results/pretrain/metrics.json").read_text())
    assert metrics["resumed_from"] >= killed_at and metrics["steps"] == 2000


def test_lint_is_clean():
    proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--lint"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_new_init_from_folder_content_reruns_what_was_built_from_it(tmp_path):
    """model.init_from: a local folder's weights and tokenizer are rule inputs, not just its path."""
    import torch

    from lmforge import loader
    from lmforge.checkpoint import save_model
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import LMTokenizer

    tok = LMTokenizer.train([f"The number {i} is {i * 3}." for i in range(200)], vocab_size=300)
    cfg = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32)
    torch.manual_seed(0)
    save_model(tmp_path / "base.pt", Transformer(cfg), kind="causal_lm", model_config=cfg.to_dict(), tokenizer=tok,
               meta={"stage": "test"})
    folder = loader.export(tmp_path / "base.pt", tmp_path / "hf")
    write_config(tmp_path, **{"model.init_from": f"hf:{folder}", "pretrain.max_steps": 2,
                              "pretrain.warmup_steps": 1})
    assert executed(snakemake(tmp_path)) == {"tokenizer", "tokenize", "pretrain"}
    # Snakemake compares small inputs by content, not by time alone: change the contents.
    torch.manual_seed(1)
    save_model(tmp_path / "base.pt", Transformer(cfg), kind="causal_lm", model_config=cfg.to_dict(), tokenizer=tok,
               meta={"stage": "test"})
    loader.export(tmp_path / "base.pt", folder)
    assert executed(snakemake(tmp_path, "-n")) == {"pretrain"}
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))
    assert executed(snakemake(tmp_path, "-n")) == {"tokenizer", "tokenize", "pretrain"}
