"""MLflow tracking: what a stage run records, read back through MlflowClient; a dead store is only a warning."""

import json
import warnings
from pathlib import Path

import pytest

from lmforge.files import file_sha256
from lmforge.tracking import StageRun, artifact_location, flatten, read_run_id, tracking_uri

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module: creating its schema takes a few seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/m.db"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(REPO)  # git_state reads the repository the stage runs in


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_flatten_nested_params():
    assert flatten({"model": {"d_model": 64, "rope": {"theta": 1e4}}, "seed": 1, "s": None}) == {
        "model.d_model": "64", "model.rope.theta": "10000.0", "seed": "1", "s": "None"}
    assert len(flatten({"long": "x" * 10_000})["long"]) == 6000


def test_stage_run_records_params_metrics_tags_lineage(store, tmp_path):
    upstream = tmp_path / "tokenizer"
    upstream.mkdir()
    (upstream / "tokenizer.json").write_text("{}")
    (upstream / "metrics.json").write_text(json.dumps({"mlflow_run_id": "parent123", "x": 1}))
    missing = tmp_path / "not-there.bin"

    with StageRun("pretrain", params={"model": {"d_model": 64}, "pretrain": {"lr": 0.003}}, uri=store,
                  experiment="exp-a", tags={"custom": "yes"}, flush_every=2,
                  inputs={"tok": upstream, "gone": missing}) as run:
        run.log_metrics({"loss": 3.0, "lr": 0.001}, step=1)
        run.log_metrics({"loss": 2.5, "skipped": None}, step=2)
        run.log_metrics({"loss": 2.0}, step=5)  # left in the buffer until exit
        run.set_tags({"best_step": 5})
    assert run.run_id

    c = client(store)
    r = c.get_run(run.run_id)
    assert r.info.status == "FINISHED"
    assert c.get_experiment(r.info.experiment_id).name == "exp-a"
    assert r.data.params == {"model.d_model": "64", "pretrain.lr": "0.003"}
    history = sorted((m.step, m.value) for m in c.get_metric_history(run.run_id, "loss"))
    assert history == [(1, 3.0), (2, 2.5), (5, 2.0)]
    assert [(m.step, m.value) for m in c.get_metric_history(run.run_id, "lr")] == [(1, 0.001)]
    assert "skipped" not in r.data.metrics

    tags = r.data.tags
    assert tags["lmforge.stage"] == "pretrain" and tags["custom"] == "yes" and tags["best_step"] == "5"
    assert tags["lmforge.status"] == "finished"
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert tags["lineage.tok.sha256"] == file_sha256(upstream)
    assert tags["lineage.tok.run_id"] == "parent123"
    assert tags["lineage.parents"] == "parent123"
    assert tags["lineage.gone.sha256"] == "None" and "lineage.gone.run_id" not in tags

    import mlflow.artifacts

    lineage = mlflow.artifacts.load_dict(f"{r.info.artifact_uri}/lineage.json")
    assert lineage == {"tok": {"path": str(upstream), "sha256": file_sha256(upstream), "run_id": "parent123"},
                       "gone": {"path": str(missing), "sha256": None, "run_id": None}}
    # Artifacts of a sqlite store sit beside its database, not in the cwd.
    assert r.info.artifact_uri.startswith(artifact_location(store))


def test_stage_run_failed_on_exception(store):
    with pytest.raises(ValueError, match="boom"):
        with StageRun("sft", uri=store, experiment="exp-b") as run:
            run.log_metrics({"loss": 1.0}, step=0)
            raise ValueError("boom")
    r = client(store).get_run(run.run_id)
    assert r.info.status == "FAILED"
    assert r.data.tags["lmforge.status"] == "failed" and r.data.tags["lmforge.error"] == "boom"
    assert r.data.metrics["loss"] == 1.0  # metrics buffered before the failure are still flushed


def test_disabled_tracking_records_nothing(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with StageRun("dpo", uri=store, experiment="exp-off", enabled=False) as run:
            run.log_metrics({"loss": 1.0}, step=0)
    assert run.run_id is None
    assert client(store).get_experiment_by_name("exp-off") is None


def test_unreachable_store_warns_and_goes_on(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    finished = False
    with pytest.warns(RuntimeWarning, match="MLflow tracking disabled for stage 'pretrain'") as caught:
        with StageRun("pretrain", uri="http://127.0.0.1:9", params={"a": 1}) as run:
            run.log_metrics({"loss": 1.0}, step=1)
            run.set_tags({"k": "v"})
            run.log_text("hello", "note.txt")
            finished = True
    assert finished and run.run_id is None and run.enabled is False
    assert sum("MLflow tracking disabled" in str(w.message) for w in caught) == 1  # one warning, not one per call


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    default = tracking_uri(None, results_dir=tmp_path / "results")
    assert default == f"sqlite:///{(tmp_path / 'results').resolve()}/mlflow.db"
    assert tracking_uri("http://config:5000", results_dir=tmp_path) == "http://config:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking_uri("http://config:5000") == "http://env:5000"
    assert tracking_uri(None) == "http://env:5000"
    assert StageRun("x", uri="http://config:5000").uri == "http://env:5000"


def test_read_run_id(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x")
    assert read_run_id(tmp_path / "model.pt") is None
    (tmp_path / "metrics.json").write_text("[1, 2]")  # not a mapping: ignored, not a crash
    (tmp_path / "meta.json").write_text(json.dumps({"mlflow_run_id": "r1"}))
    assert read_run_id(tmp_path / "model.pt") == "r1"
    assert read_run_id(tmp_path) == "r1"
