"""Stages tracking over HTTP to a real `mlflow server` on loopback; parallel stages; a dead server."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests/data/tiny.yaml"
LMFORGE = [sys.executable, "-m", "lmforge.cli"]
pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lmforge(workdir: Path, *args, uri: str, timeout: int = 300, wait: bool = True):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*LMFORGE, *args, "--config", str(TINY)], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out, err


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` with the lean settings the README gives: one worker, sqlite, local artifacts."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts")]
    log = open(root / "server.log", "w")
    # Its own session: the server forks workers, and stopping the group by the leader's PID stops them all.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            assert time.time() < deadline, "mlflow server did not answer /health within 120 s"
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, server):
    """A work folder with the tokenizer and tokenized data, both tracked on the server."""
    work = tmp_path_factory.mktemp("work")
    lmforge(work, "run", "tokenizer", uri=server)
    lmforge(work, "run", "tokenize", uri=server)
    return work


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def pretrain_runs(uri):
    exp = client(uri).get_experiment_by_name("lmforge-test")
    return client(uri).search_runs([exp.experiment_id], "tags.`lmforge.stage` = 'pretrain'")


def check_pretrain_run(uri, workdir: Path):
    """The run named in metrics.json is finished and holds every logged step and every eval."""
    import json

    metrics = json.loads((workdir / "results/pretrain/metrics.json").read_text())
    c = client(uri)
    run = c.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # tiny.yaml: 12 steps (each one tracked), an eval every 6.
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "loss")) == list(range(1, 13))
    evals = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, "val_loss"))
    assert evals == [(h["step"], pytest.approx(h["val_loss"])) for h in metrics["history"]]
    assert run.data.tags["lineage.train.run_id"]  # lineage to the tokenize run, over HTTP too
    return run.info.run_id


def test_a_stage_tracks_over_http(server, tokenized):
    lmforge(tokenized, "run", "pretrain", uri=server)
    check_pretrain_run(server, tokenized)


@pytest.mark.parametrize("store", ["server", "sqlite"])
def test_two_stages_in_parallel_lose_no_runs_and_no_metrics(server, tokenized, tmp_path, store):
    uri = server if store == "server" else f"sqlite:///{tmp_path}/shared.db"
    works = []
    for name in ("a", "b"):
        work = tmp_path / name
        shutil.copytree(tokenized / "results", work / "results")
        for done in ("pretrain", ".checkpoints"):  # this test's stage starts afresh in each folder
            shutil.rmtree(work / "results" / done, ignore_errors=True)
        works.append(work)
    before = {r.info.run_id for r in pretrain_runs(uri)} if store == "server" else set()
    procs = [lmforge(w, "run", "pretrain", uri=uri, wait=False) for w in works]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "tracking disabled" not in err, err  # no tracking warning: nothing was dropped
    ids = {check_pretrain_run(uri, w) for w in works}
    assert len(ids) == 2
    assert {r.info.run_id for r in pretrain_runs(uri)} - before == ids


def test_an_unreachable_server_only_warns(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.time()
    _, err = lmforge(tmp_path, "run", "tokenizer", uri=dead, timeout=120)
    assert time.time() - start < 90
    assert "WARNING: MLflow start failed" in err and "tracking disabled, stage continues" in err
    assert (tmp_path / "results/tokenizer/tokenizer.json").exists()
